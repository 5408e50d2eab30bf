"""ldm's gallery entry (``make gallery``): the shipped 16-channel KL autoencoder (the first stage of the flagship
chain) on the Fashion-MNIST test images."""

from gencore.gallery import Entry

CHECKPOINT = "pkg://ldm/checkpoints/autoencoder_fmnist_c16"


def entries() -> list[Entry]:
    return [
        Entry(
            package="ldm",
            title="KL autoencoder (16 channels, f4): test images and their reconstructions",
            command=["ldm-eval", f"checkpoint={CHECKPOINT}", "num_samples=1000", "out_dir={out}"],
            media=["reconstructions.png"],
            headline="reconstruction PSNR 23.5 dB, reconstruction FID-FMNIST 2.14 (1,000 test images); the class "
            "LDM over the 4-channel autoencoder: FID-FMNIST 3.66 vs pixel diffusion 28.86 at the same wall clock",
            note="The first stage of sd3_flow's teacher and ladd_turbo's student (32 x 32 -> 16 x 8 x 8 latents). "
            "ldm ships no generative checkpoint yet: see packages/ldm/README.md for the class LDM's commands.",
        )
    ]
