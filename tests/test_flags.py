import pytest

import flags


def test_parse_image_size_forms():
    assert flags.parse_image_size("160", 96) == (160, 160)
    assert flags.parse_image_size("140x116", 96) == (140, 116)
    assert flags.parse_image_size(None, 96) == (96, 96)
    assert flags.parse_image_size(None, (140, 116)) == (140, 116)


@pytest.mark.parametrize("bad", ["", "abc", "1x2x3", "12xq"])
def test_parse_image_size_rejects_garbage(bad):
    if bad == "":
        assert flags.parse_image_size(bad, 64) == (64, 64)
        return
    with pytest.raises(ValueError):
        flags.parse_image_size(bad, 64)


def test_groups_define_once():
    from absl import flags as absl_flags

    flags.define_train_flags()
    flags.define_evaluate_flags()
    flags.define_export_flags()
    flags.define_train_flags()  # a second call is a no-op, not a DuplicateFlagError
    names = set(absl_flags.FLAGS)
    for name in ("model", "data_dir", "mining", "export_dir", "flip", "checkpoint"):
        assert name in names
