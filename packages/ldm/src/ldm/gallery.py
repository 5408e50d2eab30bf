"""ldm's gallery entry (``make gallery``): the shipped class-conditional latent diffusion model, one column per
class."""

from gencore.gallery import Entry

CHECKPOINT = "pkg://ldm/checkpoints/ldm_fmnist_class_c16"
HEADLINE = "FID-FMNIST ?, class accuracy ? (1,000 samples, DDIM 50 steps, unguided)"


def entries() -> list[Entry]:
    return [
        Entry(
            package="ldm",
            title="Class-conditional latent diffusion: DDIM 50 steps",
            command=[
                "ldm-sample",
                f"checkpoint={CHECKPOINT}",
                "num_samples=40",
                "nrow=10",
                "batch_size=40",
                "sample.labels=[0,1,2,3,4,5,6,7,8,9]",
                "out_dir={out}",
            ],
            media=["grid.png"],
            headline=HEADLINE,
            note="Columns: the ten classes. A 1.1M-parameter UNet (fmnist_tiny, 32 wide) over the shipped 16-channel "
            "KL autoencoder's 8 x 8 latents (pkg://ldm/checkpoints/autoencoder_fmnist_c16), eps-prediction.",
        )
    ]

