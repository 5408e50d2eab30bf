"""taming's gallery entry (``make gallery``): the shipped class-conditional transformer over the shipped VQGAN's
codes, one column per class."""

from gencore.gallery import Entry, class_grid

CHECKPOINT = "pkg://taming/checkpoints/transformer_fmnist_class"
HEADLINE = (
    "FID-FMNIST 9.88, class accuracy 0.60 (1,000 samples, top-k 100; 8 min of training); the README table's 31-minute "
    "transformer: 7.20 / 0.70"
)


def entries() -> list[Entry]:
    return [
        class_grid(
            "taming",
            "VQGAN + class-conditional transformer over its codes",
            "taming-sample",
            CHECKPOINT,
            "sample.labels=[0,1,2,3,4,5,6,7,8,9]",
            headline=HEADLINE,
            note="Columns: the ten classes. A VQGAN (f4: 8 x 8 codes from 512; reconstruction PSNR 15.5 dB) and a "
            "4-layer GPT over its codes, both trained briefly here (pkg://taming/checkpoints/vqgan_fmnist is the "
            "first stage).",
        )
    ]
