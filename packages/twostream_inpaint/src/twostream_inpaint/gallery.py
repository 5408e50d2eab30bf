"""twostream_inpaint's gallery entries (``make gallery``): the shipped toy model filling holes in held-out photos from
two distorted keyframes, and propagating into a moving hole across an OpenCV sample video from its first and last
frames."""

from gencore.gallery import Entry

CHECKPOINT = "pkg://twostream_inpaint/checkpoints/twostream_photos"
VIDEO = "/usr/share/doc/opencv-doc/examples/data/vtest.avi"
HEADLINE = (
    "toy (2,400 batches of 8 on CPU, 64 x 64): hole PSNR 17.7 dB on 1,000 held-out targets, +1.6 dB over the "
    "mean-colour fill, -0.9 dB given another photo's keyframes; two streams = either one alone here (README)"
)


def entries() -> list[Entry]:
    return [
        Entry(
            package="twostream_inpaint",
            title="Holes in held-out photos filled from two distorted keyframes",
            command=["inpaint-sample", f"checkpoint={CHECKPOINT}", "num_samples=8", "out_dir={out}"],
            media=["grid.png"],
            headline=HEADLINE,
            note="Each row: the target with its hole (gray), the two keyframes (the same photo under other crops, "
            "rotations, scales and colours, each with a hole of its own), the result, the truth.",
        ),
        Entry(
            package="twostream_inpaint",
            title="A moving hole filled in every frame of a street video from its first and last frame",
            command=[
                "inpaint-video",
                f"checkpoint={CHECKPOINT}",
                f"video={VIDEO}",
                "start=300",
                "num_frames=24",
                "stride=2",
                "out_dir={out}",
            ],
            media=["inpainted.gif"],
            headline=HEADLINE,
            note="Left: the frames with the hole (gray); right: filled from the two keyframes through both streams "
            "(DIS flow to each keyframe, then the generator).",
        ),
    ]
