"""Import/export of the HuggingFace DebertaV2 format: round trips, loadability in transformers, clear errors."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from pretrain import hf
from pretrain.model import DebertaConfig, DebertaForMaskedLM, DebertaForReplacedTokenDetection, DebertaModel
from test_model_parity import CONFIGS


def random_hf_mlm(config: dict, seed: int = 0, scale: float = 0.01) -> transformers.DebertaV2ForMaskedLM:
    """transformers' MLM model of ``config`` with every weight perturbed by ``scale`` x N(0, 1)."""
    torch.manual_seed(seed)
    model = transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(**config)).eval()
    with torch.no_grad():
        for p in model.parameters():  # LayerNorms/biases start at 1/0: randomise so equality is meaningful
            p.add_(torch.randn_like(p) * scale)
    return model


def hf_mlm(name: str, seed: int = 0) -> transformers.DebertaV2ForMaskedLM:
    return random_hf_mlm(CONFIGS[name], seed)


def tensors(directory) -> dict[str, torch.Tensor]:
    return hf.read_state_dict(directory)[0]


def small_config(**overrides) -> DebertaConfig:
    base = dict(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=64, position_buckets=8)
    return DebertaConfig(**{**base, **overrides})


# ------------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_hf_to_native_to_hf_is_identical(name, safe, tmp_path):
    hf_model = hf_mlm(name)
    hf_model.save_pretrained(tmp_path / "hf", safe_serialization=safe)
    native = hf.from_pretrained(tmp_path / "hf")
    hf.save_pretrained(native, tmp_path / "out")
    before, after = tensors(tmp_path / "hf"), tensors(tmp_path / "out")
    # the native MLM model additionally carries the EMD position table (HF never saves it when unused)
    extra = set(after) - set(before)
    assert extra <= {"deberta.embeddings.position_embeddings.weight"}
    assert set(before) <= set(after)
    for key, tensor in before.items():
        assert torch.equal(after[key], tensor), key
    # the exported config describes the same architecture (HF's getattr defaults applied to the input)
    assert hf.load_config(tmp_path / "out") == hf.load_config(tmp_path / "hf")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["legacy"] == CONFIGS[name]["legacy"]


def test_bare_encoder_round_trip(tmp_path):
    torch.manual_seed(3)
    model = transformers.DebertaV2Model(transformers.DebertaV2Config(**CONFIGS["v3_style"]))
    model.save_pretrained(tmp_path / "hf")
    native = hf.from_pretrained(tmp_path / "hf")
    assert type(native) is DebertaModel
    hf.save_pretrained(native, tmp_path / "out")
    before, after = tensors(tmp_path / "hf"), tensors(tmp_path / "out")
    assert set(before) == set(after)
    assert all(torch.equal(after[k], v) for k, v in before.items())


# ------------------------------------------------------------------------------------------------ export
def load_report(cls, directory):
    model, info = cls.from_pretrained(directory, output_loading_info=True)
    return model.eval(), {k: set(v) for k, v in info.items() if k != "error_msgs"}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_loads_in_transformers_without_new_weights(name, tmp_path):
    torch.manual_seed(5)
    config = DebertaConfig.from_hf_dict({k: v for k, v in CONFIGS[name].items() if k != "legacy"})
    native = DebertaForMaskedLM(config).eval()
    hf.save_pretrained(native, tmp_path / "out")

    mlm, info = load_report(transformers.AutoModelForMaskedLM, tmp_path / "out")
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set()}
    base, base_info = load_report(transformers.AutoModel, tmp_path / "out")
    assert base_info["missing_keys"] == set() and base_info["mismatched_keys"] == set()
    # exactly what transformers reports for its own MLM saves: the MLM head is not part of the bare encoder
    assert all(k.startswith(("lm_predictions.", "cls.")) for k in base_info["unexpected_keys"])

    ids = torch.randint(4, config.vocab_size, (2, 50))
    mask = torch.ones_like(ids)
    mask[0, 33:] = 0
    types = torch.zeros_like(ids) if config.type_vocab_size else None
    with torch.no_grad():
        ours = native(ids, mask, token_type_ids=types)
        theirs = mlm(input_ids=ids, attention_mask=mask, token_type_ids=types)
        theirs_base = base(input_ids=ids, attention_mask=mask, token_type_ids=types)
    valid = mask.bool()
    torch.testing.assert_close(theirs.logits[valid], ours.logits[valid], atol=1e-4, rtol=0)
    torch.testing.assert_close(theirs_base.last_hidden_state[valid], ours.last_hidden_state[valid], atol=1e-5, rtol=0)


def test_export_writes_complete_config(tmp_path):
    hf.save_pretrained(DebertaForMaskedLM(small_config()), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in ("position_buckets", "share_att_key", "norm_rel_ebd", "conv_kernel_size", "conv_act", "conv_groups",
                "attention_head_size", "embedding_size", "relative_attention", "pos_att_type", "max_relative_positions",
                "position_biased_input", "layer_norm_eps", "legacy"):
        assert key in config, key
    assert config["model_type"] == "deberta-v2" and config["relative_attention"] is True
    assert config["architectures"] == ["DebertaV2ForMaskedLM"]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_discriminator_export_is_a_clean_encoder_and_keeps_its_head(tmp_path):
    torch.manual_seed(7)
    disc = DebertaForReplacedTokenDetection(small_config()).eval()
    hf.save_pretrained(disc, tmp_path / "disc")
    base, info = load_report(transformers.AutoModel, tmp_path / "disc")
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set()}
    back = hf.from_pretrained(tmp_path / "disc")
    assert type(back) is DebertaForReplacedTokenDetection
    for key, value in disc.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    ids = torch.randint(4, 200, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids).last_hidden_state, disc(ids).last_hidden_state, atol=1e-5, rtol=0)


def test_original_style_checkpoint_with_emd_table_and_rtd_head(tmp_path):
    """Original Microsoft checkpoints: pytorch_model.bin, position table present although unused by the encoder,
    `lm_predictions.*` (generator/MLM) or `mask_predictions.*` (discriminator)."""
    torch.manual_seed(11)
    mlm = DebertaForMaskedLM(small_config())
    state = {k: v.clone() for k, v in mlm.state_dict().items()}
    (tmp_path / "gen").mkdir()
    torch.save(state, tmp_path / "gen" / "pytorch_model.bin")
    (tmp_path / "gen" / "config.json").write_text(json.dumps(mlm.config.to_hf_dict()))
    loaded = hf.from_pretrained(tmp_path / "gen")
    assert isinstance(loaded, DebertaForMaskedLM)
    assert torch.equal(loaded.deberta.embeddings.position_embeddings.weight, state["deberta.embeddings.position_embeddings.weight"])

    disc = DebertaForReplacedTokenDetection(small_config())
    state = {k: v.clone() for k, v in disc.state_dict().items()}
    state["deberta.embeddings.position_embeddings.weight"] = torch.randn(64, 32)  # dead weight in released files
    (tmp_path / "disc").mkdir()
    torch.save(state, tmp_path / "disc" / "pytorch_model.bin")
    (tmp_path / "disc" / "config.json").write_text(json.dumps(disc.config.to_hf_dict()))
    loaded = hf.from_pretrained(tmp_path / "disc")
    assert isinstance(loaded, DebertaForReplacedTokenDetection)
    assert torch.equal(loaded.mask_predictions.classifier.weight, state["mask_predictions.classifier.weight"])


def test_forced_head_is_initialised_and_logged(tmp_path, caplog):
    hf.save_pretrained(DebertaModel(small_config()), tmp_path / "enc")
    with caplog.at_level(logging.INFO, logger="pretrain.hf"):
        model = hf.from_pretrained(tmp_path / "enc", head="mlm")
    assert isinstance(model, DebertaForMaskedLM)
    assert "lm_predictions.lm_head.dense.weight" in caplog.text


def test_export_replaces_atomically_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "out"
    hf.save_pretrained(DebertaModel(small_config()), target)
    first = tensors(target)
    with pytest.raises(hf.CheckpointError, match="no tokenizer files"):
        hf.save_pretrained(DebertaModel(small_config()), target, tokenizer=tmp_path)  # no tokenizer there
    assert all(torch.equal(tensors(target)[k], v) for k, v in first.items())  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging directory left behind


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def good_dir(tmp_path):
    hf.save_pretrained(DebertaForMaskedLM(small_config()), tmp_path / "model")
    return tmp_path / "model"


def edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(hf.CheckpointError, match=r"empty/config\.json: missing"):
        hf.from_pretrained(tmp_path / "empty")
    with pytest.raises(hf.CheckpointError, match="not a directory"):
        hf.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "change, field",
    [
        ({"relative_attention": False}, "relative_attention"),
        ({"pos_att_type": "p2c|c2p|p2p"}, "pos_att_type"),
        ({"norm_rel_ebd": "batch_norm"}, "norm_rel_ebd"),
        ({"hidden_act": "mish"}, "hidden_act"),
        ({"conv_kernel_size": 4}, "conv_kernel_size"),
        ({"model_type": "bert"}, "model_type"),
        ({"mystery_scaling": 2.0}, "mystery_scaling"),
    ],
)
def test_unsupported_config_value_names_file_and_field(good_dir, change, field):
    edit_config(good_dir, **change)
    with pytest.raises(hf.CheckpointError) as err:
        hf.from_pretrained(good_dir)
    message = str(err.value)
    assert "config.json" in message and f"'{field}'" in message
    assert message.count("\n") == 0


def test_missing_tensor_names_file_and_key(good_dir):
    state = load_file(good_dir / "model.safetensors")
    del state["deberta.encoder.layer.1.attention.self.value_proj.weight"]
    save_file(state, good_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(hf.CheckpointError, match=r"model\.safetensors: missing tensor\(s\) \['deberta\.encoder\.layer\.1\.attention\.self\.value_proj\.weight'\]"):
        hf.from_pretrained(good_dir)


def test_wrong_shape_names_file_key_and_shapes(good_dir):
    state = load_file(good_dir / "model.safetensors")
    state["deberta.encoder.rel_embeddings.weight"] = torch.zeros(10, 32)
    save_file(state, good_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(hf.CheckpointError, match=r"model\.safetensors: tensor 'deberta\.encoder\.rel_embeddings\.weight' has shape \[10, 32\] but config\.json implies \[16, 32\]"):
        hf.from_pretrained(good_dir)


def test_config_and_weights_disagree(good_dir):
    edit_config(good_dir, num_hidden_layers=1)
    with pytest.raises(hf.CheckpointError, match=r"unexpected tensor\(s\) \['deberta\.encoder\.layer\.1\."):
        hf.from_pretrained(good_dir)


def test_truncated_weights_file(good_dir):
    data = (good_dir / "model.safetensors").read_bytes()
    (good_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(hf.CheckpointError, match=r"model\.safetensors: cannot be read"):
        hf.from_pretrained(good_dir)


def test_no_weights_and_missing_shard(good_dir):
    (good_dir / "model.safetensors").unlink()
    with pytest.raises(hf.CheckpointError, match="no weights found"):
        hf.from_pretrained(good_dir)
    (good_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors"}}))
    with pytest.raises(hf.CheckpointError, match=r"lists shard 'model-00001\.safetensors', which is missing"):
        hf.from_pretrained(good_dir)


def test_sharded_checkpoint_loads(tmp_path):
    hf_model = hf_mlm("v3_style")
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    native = hf.from_pretrained(tmp_path / "hf")
    single = hf.from_pretrained(_single_file_copy(hf_model, tmp_path / "single"))
    for key, value in single.state_dict().items():
        if "position_embeddings" not in key:  # freshly initialised EMD table, random in both
            assert torch.equal(native.state_dict()[key], value), key


def _single_file_copy(model, directory):
    model.save_pretrained(directory)
    return directory
