def test_sample_config_errors_checks_a_tasks_own_counts(tmp_path):
    from gencore.validate import sample_config_errors

    cfg = {"checkpoint": str(tmp_path), "num_samples": 3, "num_images": 0, "other": 0}
    assert sample_config_errors(cfg) == []
    assert sample_config_errors(cfg, ("num_images", "other", "unset")) == [
        "num_images: expected an integer >= 1, got 0",
        "other: expected an integer >= 1, got 0",
    ]
