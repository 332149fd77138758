import pytest

from server.degradation.config import ConfigError, DegradationConfig


def test_defaults_are_the_spec():
    c = DegradationConfig()
    assert c.profile == "vcisr" and c.lr_size == 90 and c.video_batch_size == 128
    assert c.first_batch_range == (32, 128)
    assert c.kernel_probs == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    assert c.codec_probs == (0.2, 0.2, 0.4, 0.2) and c.bitrate_kbps == (4000, 6000)
    assert c.crf_x264 == (20, 32) and c.crf_x265 == (25, 37)
    assert not c.kernel_per_batch and not c.resize2_relative_to_current


def test_vcisr_code_profile_applies_quirks_and_overrides_win():
    c = DegradationConfig.for_profile("vcisr-code")
    assert c.kernel_per_batch and c.resize2_relative_to_current and c.mpeg2_aspect
    assert c.bitrate_kbps == (3800, 5800) and c.aspect_shrink_range == (0.8, 1.0)
    assert c.first_batch_range == (32, 127)
    c2 = DegradationConfig.for_profile("vcisr-code", bitrate_kbps=[4000, 6000])
    assert c2.bitrate_kbps == (4000, 6000) and c2.kernel_per_batch


@pytest.mark.parametrize("bad, needle", [
    ({"nope": 1}, "unknown config key"),
    ({"v2_prob": 1.5}, "v2_prob"),
    ({"codec_probs": [0.5, 0.5, 0.5, 0.5]}, "codec_probs"),
    ({"crf_x264": [32, 20]}, "crf_x264"),
    ({"video_batch_size": "many"}, "video_batch_size"),
    ({"video_batch_size": 10**9}, "video_batch_size"),
    ({"profile": "fast"}, "profile"),
    ({"jpeg_impl": "magic"}, "jpeg_impl"),
    ({"kernel_per_batch": 1}, "kernel_per_batch"),
])
def test_bad_values_are_rejected_with_a_message(bad, needle):
    with pytest.raises(ConfigError, match=needle):
        DegradationConfig.from_dict(bad)


def test_toml_and_yaml_files(tmp_path):
    t = tmp_path / "c.toml"
    t.write_text('[degradation]\nprofile = "vcisr-code"\nv2_prob = 0.5\n')
    c = DegradationConfig.from_file(t)
    assert c.v2_prob == 0.5 and c.kernel_per_batch
    y = tmp_path / "c.yaml"
    y.write_text("crf_x264: [22, 30]\n")
    assert DegradationConfig.from_file(y).crf_x264 == (22, 30)
    bad = tmp_path / "bad.toml"
    bad.write_text("this is = = not toml")
    with pytest.raises(ConfigError, match="cannot parse"):
        DegradationConfig.from_file(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        DegradationConfig.from_file(tmp_path / "missing.toml")


def test_round_trip_through_dict():
    c = DegradationConfig.for_profile("vcisr-code", v2_prob=0.7)
    assert DegradationConfig.from_dict(c.to_dict()) == c
    assert c.replace(v2_prob=0.9).v2_prob == 0.9
