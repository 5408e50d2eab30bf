"""shapebias's gallery entries (``make gallery``): the shipped toy CNN's shape / texture dimensions per stage, and
held-out cue-conflict stimuli with its answers."""

from gencore.gallery import Entry

CHECKPOINT = "pkg://shapebias/checkpoints/stylized_cnn"
HEADLINE = "toy SmallResNet trained on the shape of cue-conflict silhouettes (Fashion-MNIST x real textures; README)"


def entries() -> list[Entry]:
    return [
        Entry(
            package="shapebias",
            title="How many dimensions of each stage encode shape, texture, neither",
            command=["shapebias-dims", f"checkpoint={CHECKPOINT}", "num_pairs=400", "out_dir={out}"],
            media=["dims.png"],
            headline=HEADLINE,
            note="The paper's estimator over 400 factor pairs of held-out silhouettes: shape pairs share a "
            "silhouette under two textures, texture pairs a texture on two classes.",
        ),
        Entry(
            package="shapebias",
            title="Held-out cue-conflict stimuli and the network's answers",
            command=["shapebias-sample", f"checkpoint={CHECKPOINT}", "num_samples=16", "nrow=8", "out_dir={out}"],
            media=["grid.png"],
            headline=HEADLINE,
            note="Silhouettes of Fashion-MNIST test items filled with real texture photographs; samples.npz holds "
            "each stimulus's shape, texture and the predicted class.",
        ),
    ]
