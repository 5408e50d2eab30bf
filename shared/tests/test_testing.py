"""The helpers other packages' end-to-end tests rely on."""

import pytest

from gencore.data.fashion_mnist import DEFAULT_ROOT
from gencore.testing import logged_values, mean_image_psnr


def test_logged_values_reads_every_version_in_order(tmp_path):
    for version, rows in ((10, "3.0,\n"), (2, "1.0,\n,x\n2.0,\n")):
        folder = tmp_path / "csv" / f"version_{version}"
        folder.mkdir(parents=True)
        (folder / "metrics.csv").write_text("train/loss,other\n" + rows)
    assert logged_values(tmp_path, "train/loss") == [1.0, 2.0, 3.0]  # version_2 before version_10, blanks skipped
    assert logged_values(tmp_path, "missing") == []
    with pytest.raises(FileNotFoundError, match="run_dir"):
        logged_values(tmp_path / "nowhere", "train/loss")


@pytest.mark.skipif(not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST missing")
def test_mean_image_baseline_is_a_low_but_non_trivial_psnr():
    small, full = mean_image_psnr(16, n_train=500, n_test=50), mean_image_psnr(28, n_train=500, n_test=50)
    assert 9.0 < small < 14.0 and 9.0 < full < 14.0
    assert mean_image_psnr(16, n_train=500, n_test=50) == small  # deterministic: first n images, no sampling
