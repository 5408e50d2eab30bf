"""geofree's gallery entries (``make gallery``): the shipped toy model's samples of held-out synthetic rooms (several
plausible views per source and camera) and a rendered camera walk next to the room's true views."""

from gencore.gallery import Entry

CHECKPOINT = "pkg://geofree/checkpoints/impl_nodepth_scenes"
HEADLINE = (
    "toy (2,000 steps on CPU): samples 12.8 dB PSNR vs the true view; the target tokens are 0.04 nats likelier given "
    "their own source than another's: the model has only begun to use its conditioning (the README's verdict); "
    "KV-cached sampling 20-43x the official loop"
)


def entries() -> list[Entry]:
    return [
        Entry(
            package="geofree",
            title="Novel views from one image and a camera, no geometry in the model",
            command=[
                "geofree-sample",
                f"checkpoint={CHECKPOINT}",
                "num_samples=24",
                "samples_per_view=4",
                "out_dir={out}",
            ],
            media=["grid.png"],
            headline=HEADLINE,
            note="Each row: the source view, the true target view, the source forward-warped with its depth (what "
            "geometry alone gives: holes), then four samples of the implicit model, which only saw the source's tokens "
            "and 30 camera numbers. At this budget they are textures of the rooms, not yet the target view.",
        ),
        Entry(
            package="geofree",
            title="A camera walk through a held-out room, each frame sampled from the first",
            command=["geofree-render", f"checkpoint={CHECKPOINT}", "index=3", "steps=11", "out_dir={out}"],
            media=["video.gif", "frames.png"],
            headline=HEADLINE,
            note="Left / top: the sampled frames (the source first); right / bottom: the room's true views.",
        ),
    ]
