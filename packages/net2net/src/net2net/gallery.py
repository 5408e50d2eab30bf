"""net2net's gallery entries (``make gallery``): the shipped toy cINN's samples of each dataset of the union and its
projections of held-out images onto the other datasets."""

from gencore.gallery import Entry

CHECKPOINT = "pkg://net2net/checkpoints/cinn_union"
HEADLINE = "toy cINN over the union autoencoder's 256-d latents (Fashion-MNIST + digits + LFW faces; README)"


def entries() -> list[Entry]:
    return [
        Entry(
            package="net2net",
            title="One residual, three datasets: held-out images projected onto each dataset of the union",
            command=["net2net-translate", f"checkpoint={CHECKPOINT}", "num_images=3", "out_dir={out}"],
            media=["translate.png"],
            headline=HEADLINE,
            note="Each row: a held-out image (Fashion-MNIST, digits, then LFW faces), its reconstruction, and "
            "z' = T^-1(T(z | its dataset) | target) for the targets Fashion-MNIST, digits, LFW.",
        ),
        Entry(
            package="net2net",
            title="Samples of each dataset from the same cINN",
            command=["net2net-sample", f"checkpoint={CHECKPOINT}", "num_samples=24", "nrow=8", "out_dir={out}"],
            media=["grid.png"],
            headline=HEADLINE,
            note="v ~ N(0, I), z = T^-1(v | dataset), decoded: the datasets in turn (Fashion-MNIST, digits, LFW).",
        ),
    ]
