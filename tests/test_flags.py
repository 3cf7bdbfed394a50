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


def _flag_values():
    from absl import flags as absl_flags

    fv = absl_flags.FlagValues()
    absl_flags.DEFINE_integer("crop_size", 160, "new name", flag_values=fv)
    absl_flags.DEFINE_enum("alignment", "box", ("box", "landmarks"), "new name", flag_values=fv)
    flags.define_deprecated_alias("image_size", "crop_size", flag_values=fv)
    flags.define_deprecated_alias("align", "alignment", flag_values=fv)
    flags.define_deprecated_alias("align", "alignment", flag_values=fv)  # again: a no-op
    return fv


def test_deprecated_alias_sets_the_new_flag_with_a_warning(capsys):
    fv = _flag_values()
    fv(["prog", "--image_size=64", "--align=landmarks"])
    assert flags.apply_deprecated_aliases("prog", flag_values=fv) == ["align", "image_size"]
    assert fv.crop_size == 64 and fv["crop_size"].present
    assert fv.alignment == "landmarks"
    err = capsys.readouterr().err
    assert "prog: warning: --image_size is deprecated" in err and "use --crop_size" in err
    assert "--align is deprecated" in err


def test_deprecated_alias_parses_like_the_new_flag():
    from absl import flags as absl_flags

    fv = _flag_values()
    with pytest.raises(absl_flags.IllegalFlagValueError):
        fv(["prog", "--align=sideways"])  # the enum's choices apply to the old name too


def test_new_name_alone_is_untouched(capsys):
    fv = _flag_values()
    fv(["prog", "--crop_size=96"])
    assert flags.apply_deprecated_aliases("prog", flag_values=fv) == []
    assert fv.crop_size == 96 and capsys.readouterr().err == ""


def test_old_and_new_name_disagreeing_is_a_usage_error():
    from exit_codes import USAGE, CliError

    fv = _flag_values()
    fv(["prog", "--crop_size=96", "--image_size=64"])
    with pytest.raises(CliError) as info:
        flags.apply_deprecated_aliases("prog", flag_values=fv)
    assert info.value.exit_code == USAGE and "give only --crop_size" in str(info.value)


def test_alias_cannot_shadow_another_flag():
    fv = _flag_values()
    with pytest.raises(ValueError):
        flags.define_deprecated_alias("alignment", "crop_size", flag_values=fv)


def test_enum_choices_come_from_choices_module():
    """flags.py offers exactly the names of choices.py (defined once, TF-free)."""
    from absl import flags as absl_flags

    import choices

    flags.define_train_flags()
    flags.define_faces_flags()
    fv = absl_flags.FLAGS
    for flag, names in (("model", choices.MODEL_NAMES), ("loss", choices.LOSSES),
                        ("mining", choices.MINING_STRATEGIES), ("distance", choices.DISTANCES),
                        ("pretrain_head", choices.HEADS), ("optimizer", choices.OPTIMIZERS),
                        ("alignment", choices.ALIGNMENTS), ("linkage", choices.LINKAGES),
                        ("recipe", choices.RECIPES)):
        assert list(fv[flag].parser.enum_values) == list(names), flag
