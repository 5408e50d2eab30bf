"""The shared sweep of bad config values, for every landed package: each is refused by `gencore.run.train` before
anything is trained or written, with a message that names the field, and the run folder stays empty. A later
package adds its rows here (PACKAGE_DONE.md: "the shared sweep")."""

import pytest

from gencore import run
from gencore.cli import compose
from gencore.data.fashion_mnist import DEFAULT_ROOT
from gencore.validate import ConfigError

pytestmark = pytest.mark.skipif(
    not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST missing"
)

TAMING = ["experiment=vqgan_fmnist", "module.model.preset=tiny", "datamodule.image_size=16"]
LDM = ["experiment=pixel_fmnist_class"]
SD3 = [
    "experiment=fmnist_rf_lognorm",
    "module.first_stage=null",
    "+module.image_channels=1",
    "+module.transformer.in_channels=1",
    "+module.transformer.out_channels=1",
    "+module.transformer.patch_size=4",
    "+module.transformer.sample_size=32",
]
GEN1 = ["experiment=tiny"]
IMAGEBART = ["experiment=tiny"]
GEOFREE = ["experiment=tiny"]
TSI = ["experiment=tiny"]
NET2NET = ["experiment=cinn_union", "first_stage=pkg://ldm/checkpoints/autoencoder_fmnist", "datamodule.limit=16"]
SHAPEBIAS = ["experiment=tiny"]
LIMIT_VAL = "datamodule.limit_val=8"  # the image datamodules' validation cap
TAMING, LDM, SD3 = [*TAMING, LIMIT_VAL], [*LDM, LIMIT_VAL], [*SD3, LIMIT_VAL]
COMMON = ["datamodule.num_workers=0", "trainer.max_steps=2"]  # if one is not refused
TASK_TRAIN = {"imagebart"}  # <name>-train works before gencore.run.train (imagebart: remap=auto)

CASES = [
    # package, base overrides, bad override, what the message must say
    ("taming", TAMING, "module.learning_rate=fast", r"module\.learning_rate: expected a number, got 'fast'"),
    ("taming", TAMING, "trainer.max_steps=ten", r"trainer\.max_steps: expected an integer, got 'ten'"),
    ("taming", TAMING, "trainer.max_steps=0", r"trainer\.max_steps: 0 trains nothing"),
    ("taming", TAMING, "datamodule.image_size=17", r"image_size=17 is not divisible by .* factor 2"),
    ("taming", TAMING, "+module.loss.disc_strat=3", r"module\.loss\.disc_strat: .*\(did you mean disc_start\?\)"),
    ("taming", TAMING, "datamodule.root=/nowhere", r"/nowhere"),
    ("ldm", LDM, "+module.unet.num_head_channels=24", r"module\.unet: num_head_channels=24 does not divide"),
    ("ldm", LDM, "datamodule.image_size=28", r"datamodule\.image_size=28 but module\.image_size=32"),
    ("ldm", LDM, "module.learning_rate=fast", r"module\.learning_rate: expected a number"),
    ("ldm", LDM, "module.p_uncond=1.5", r"module: p_uncond must be a probability"),
    ("sd3_flow", SD3, "datamodule.image_size=16", r"datamodule\.image_size=16 but module\.image_size=32"),
    ("sd3_flow", SD3, "module.objective=rf/banana", r"module: .*banana"),
    ("sd3_flow", SD3, "module.learning_rate=fast", r"module\.learning_rate: expected a number"),
    ("sd3_flow", SD3, "trainer.max_steps=-5", r"trainer\.max_steps: -5 trains nothing"),
    ("gen1_video", GEN1, "datamodule.size=16", r"datamodule\.size=16 but module\.image_size=8"),
    # a recipe that trains its first stage first: the mismatch is found from the config, before that stage runs
    ("gen1_video", ["experiment=opencv_toy"], "datamodule.size=16", r"datamodule\.size=16 but module\.image_size=32"),
    ("gen1_video", GEN1, "datamodule.num_frames=12", r"num_frames=12 exceeds the unet's max_frames=8"),
    ("gen1_video", GEN1, "module.image_ratio=0.5", r"image_ratio=0\.5 needs image batches"),
    ("gen1_video", GEN1, "module.learning_rate=fast", r"module\.learning_rate: expected a number"),
    ("gen1_video", GEN1, "module.structure.name=depthz", r"depthz"),
    ("gen1_video", GEN1, "+module.unet.max_structure_level=-1", r"max_structure_level must be >= 0"),
    ("gen1_video", GEN1, "datamodule.paths=[/nowhere.mp4]", r"no such video file\(s\): /nowhere\.mp4"),
    ("gen1_video", GEN1, "+module.structure_init_std=-0.1", r"structure_init_std must be >= 0"),
    ("gen1_video", GEN1, "+module.content_augment=1.5", r"content_augment must be in \[0, 1\)"),
    ("imagebart", IMAGEBART, "module.alpha=[0.0,2.0]", r"module: alpha values must be in \[0, 1\]"),
    ("imagebart", IMAGEBART, "module.num_steps=0", r"num_steps must be an integer >= 1"),
    ("imagebart", IMAGEBART, "train_stages=[3]", r"train_stages must be distinct stages in \[1, T=2\]"),
    ("imagebart", IMAGEBART, "module.redraw_prob=linear", r"unknown redraw_prob 'linear'"),
    ("imagebart", IMAGEBART, "+module.num_codes=512", r"num_codes=512 .* its remap lists \d+ codes"),
    ("imagebart", [*IMAGEBART, "module.first_stage.remap=null"], "+module.num_codes=40", r"512 codes and no remap"),
    ("imagebart", IMAGEBART, "first_stage=/nowhere", r"module\.first_stage: first stage not found: /nowhere"),
    ("imagebart", IMAGEBART, "datamodule.image_size=28", r"datamodule\.image_size=28 but module\.image_size=32"),
    ("imagebart", IMAGEBART, "module.learning_rate=fast", r"module\.learning_rate: expected a number"),
    ("geofree", GEOFREE, "datamodule.size=[30,48]", r"image size 30x48 is not divisible by the VQGAN's .* factor 4"),
    ("geofree", GEOFREE, "module.image_size=[32,32]", r"the data gives \(32, 48\) views but the model .* \(32, 32\)"),
    ("geofree", GEOFREE, "module.depth_scale=magic", r"depth_scale must be sparse .* got 'magic'"),
    ("geofree", GEOFREE, "module.merge_channels=100", r"merge_channels=100 but the depth and image codes are 128 wide"),
    ("geofree", GEOFREE, "module.depth_stage=null", r"use_depth needs a depth_stage"),
    ("geofree", GEOFREE, "first_stage=/nowhere", r"module\.first_stage: first stage not found: /nowhere"),
    ("geofree", GEOFREE, "module.transformer.n_head=3", r"n_embd=32 must be divisible by n_head=3"),
    ("geofree", GEOFREE, "module.learning_rate=fast", r"module\.learning_rate: expected a number"),
    ("twostream_inpaint", TSI, "module.learning_rate=fast", r"module\.learning_rate: expected a number"),
    (
        "twostream_inpaint",
        TSI,
        "datamodule.size=36",
        r"datamodule: KeyframeImages: size must be a positive multiple of 8",
    ),
    ("twostream_inpaint", TSI, "module.image_size=48", r"datamodule\.size=32 but module\.image_size=48"),
    (
        "twostream_inpaint",
        [*TSI, "datamodule.size=40", "module.image_size=40"],
        "module.generator.n_downsampling=4",
        r"datamodule\.size=40 is not divisible by the generator's downsampling factor 16",
    ),
    ("twostream_inpaint", TSI, "datamodule.n_references=0", r"n_references must be an integer >= 1, got 0"),
    ("twostream_inpaint", TSI, "module.generator.num_heads=3", r"module\.generator: .* divisible by num_heads \(3\)"),
    ("twostream_inpaint", TSI, "module.perceptual=vgg", r"unknown perceptual loss 'vgg'; valid: resnet_pl, fmnist"),
    ("twostream_inpaint", TSI, "flow.kind=magic", r"module\.flow: unknown flow estimator kind 'magic'"),
    ("twostream_inpaint", TSI, "module.flow=null", r"deformable, flow-guided\) stream but no flow estimator"),
    ("net2net", NET2NET, "+module.flow.in_channels=128", r"latents of width 256 .* in_channels=128"),
    ("net2net", NET2NET, "module.dataset_names=[fashion_mnist,digits]", r"width 2, .* conditioning_dim=3"),
    ("net2net", NET2NET, "datamodule.members=[fashion_mnist,cats]", r"cats"),
    ("net2net", NET2NET, "datamodule.image_size=30", r"image_size 30 is not divisible by .* factor 4"),
    ("net2net", NET2NET, "datamodule.per_member=0", r"per_member must be"),
    ("net2net", NET2NET, "module.flow.preset=huge", r"unknown .*preset 'huge'"),
    ("net2net", NET2NET, "first_stage=/nowhere", r"/nowhere"),
    ("net2net", NET2NET, "module.learning_rate=fast", r"module\.learning_rate: expected a number"),
    ("shapebias", SHAPEBIAS, "module.net.preset=huge", r"module\.net: .*unknown preset 'huge'; presets: tiny, toy"),
    ("shapebias", SHAPEBIAS, "module.num_classes=5", r"module: the network has 10 outputs but num_classes=5"),
    ("shapebias", SHAPEBIAS, "datamodule.textures=[brick,plaid]", r"datamodule: .*'plaid'.*brick"),
    ("shapebias", SHAPEBIAS, "datamodule.pairing=random", r"datamodule: .*pairing.*'random'"),
    ("shapebias", SHAPEBIAS, "datamodule.image_size=8", r"datamodule: .*image_size.*8"),
    ("shapebias", SHAPEBIAS, "datamodule.texture_consistency=1.5", r"datamodule: .*texture_consistency.*1\.5"),
    ("shapebias", SHAPEBIAS, "module.lr=fast", r"module\.lr: expected a number, got 'fast'"),
    ("shapebias", SHAPEBIAS, "module.snapshot_every_n_epochs=0", r"module: snapshot_every_n_epochs must be >= 1"),
]


def configs(package: str):
    return __import__(f"{package}.cli", fromlist=["CONFIGS"]).CONFIGS


@pytest.mark.parametrize(("package", "base", "bad", "message"), CASES, ids=[f"{c[0]}:{c[2]}" for c in CASES])
def test_bad_value_is_refused_before_anything_runs(tmp_path, package, base, bad, message):
    cfg = compose(configs(package), "train", [*base, *COMMON, f"run_dir={tmp_path}", bad])
    train = __import__(f"{package}.tasks", fromlist=["train"]).train if package in TASK_TRAIN else run.train
    with pytest.raises(ConfigError, match=message):
        train(cfg)
    assert not list(tmp_path.iterdir())  # no config.yaml, no checkpoints, no lock left behind
