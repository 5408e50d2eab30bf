"""gen1_video's gallery entry (``make gallery``): the shipped toy Gen-1 model edits a clip of the opencv-doc
``vtest.avi`` (its structure) with the content of a frame of ``Megamind.avi``, from the command line."""

from gencore.gallery import Entry

CHECKPOINT = "pkg://gen1_video/checkpoints/gen1_toy"
DATA = "/usr/share/doc/opencv-doc/examples/data"
HEADLINE = (
    "frame consistency 0.973 at temporal guidance 1.5 vs 0.635 frame by frame (inputs 0.982); structure fidelity "
    "0.47 vs 0.16 for unrelated clips (32 real clips, gen1-eval)"
)


def entries() -> list[Entry]:
    return [
        Entry(
            package="gen1_video",
            title="Video editing: vtest.avi's structure, another video's content",
            command=[
                "gen1-edit",
                f"checkpoint={CHECKPOINT}",
                f"input={DATA}/vtest.avi",
                f"image={DATA}/Megamind.avi",
                "image_frame=120",
                "ts=2",
                "omega_t=1.5",
                "stride=2",
                "out_dir={out}",
            ],
            media=["edit.gif", "strip.png"],
            headline=HEADLINE,
            note="Left (top row of the strip): the input frames, 32 x 32 grey, every 2nd frame; right (bottom row): "
            "the edit, DDIM 50 steps, content guidance 3, temporal guidance 1.5, structure level 2. The toy's content "
            "effect is small: the layout comes from the input's edges, the look mostly from the model's prior.",
        )
    ]
