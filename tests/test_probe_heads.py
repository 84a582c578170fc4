"""The probe's task heads compute what transformers' DebertaV2For{Sequence,Token}Classification compute (fp32, random
weights, padding in the batch), and a fine-tuned model exported here loads in transformers with nothing missing."""

from __future__ import annotations

import pytest
import torch
import transformers

from pretrain.model import DebertaConfig
from pretrain.model.task_heads import HeadConfig, task_model
from pretrain.probe.export import load_task_model, save_task_model
from test_model_parity import CONFIGS

HF_CLASSES = {"classification": transformers.DebertaV2ForSequenceClassification,
              "regression": transformers.DebertaV2ForSequenceClassification,
              "token_classification": transformers.DebertaV2ForTokenClassification}
CASES = [  # (architecture, task type, labels, extra head fields)
    ("v3_style", "classification", ["neg", "pos"], {}),
    ("v2_style", "classification", ["a", "b", "c"], {"pooler_hidden_act": "tanh"}),
    ("v3_style", "regression", [], {}),
    ("v2_style", "token_classification", ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"], {}),
]


def batch(name: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 320, (3, 41), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    mask[2, 12:] = 0
    ids[mask == 0] = 0
    types = (torch.arange(41) > 20).long().expand(3, -1) if name == "v2_style" else None  # a text pair
    return ids, mask, types


def hf_task_model(name: str, task_type: str, labels: list[str], extra: dict):
    fields = {k: v for k, v in CONFIGS[name].items() if k != "legacy"}
    if task_type == "regression":
        fields.update(num_labels=1, problem_type="regression")
    else:
        fields.update(id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)})
    torch.manual_seed(0)
    model = HF_CLASSES[task_type](transformers.DebertaV2Config(**fields, **extra)).eval()
    with torch.no_grad():  # biases and LayerNorms start at 0/1: randomise every tensor so all of them are checked
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.mark.parametrize("name,task_type,labels,extra", CASES, ids=[c[1] + "-" + c[0] for c in CASES])
def test_transformers_fine_tune_loads_and_gives_the_same_logits(name, task_type, labels, extra, tmp_path):
    reference = hf_task_model(name, task_type, labels, extra)
    reference.save_pretrained(tmp_path / "hf")
    native = load_task_model(tmp_path / "hf").eval()
    assert native.head.labels == labels and native.head.task_type == task_type
    ids, mask, types = batch(name)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        got = native(ids, mask, types).logits
    if task_type == "regression":
        expected = expected.view(-1)
    if task_type == "token_classification":
        valid = mask.bool()
        expected, got = expected[valid], got[valid]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,task_type,labels,extra", CASES[:1] + CASES[2:], ids=["classification", "regression",
                                                                                   "token_classification"])
def test_export_loads_in_transformers_with_no_missing_keys_and_same_predictions(name, task_type, labels, extra,
                                                                                tmp_path):
    config = DebertaConfig.from_hf_dict({k: v for k, v in CONFIGS[name].items() if k != "legacy"})
    torch.manual_seed(2)
    native = task_model(config, HeadConfig(task_type, labels)).eval()
    with torch.no_grad():
        for p in native.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_task_model(native, tmp_path / "out")
    auto = (transformers.AutoModelForTokenClassification if task_type == "token_classification"
            else transformers.AutoModelForSequenceClassification)
    loaded, info = auto.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert type(loaded) is HF_CLASSES[task_type]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    if task_type != "regression":
        assert [loaded.config.id2label[i] for i in range(len(labels))] == labels
    ids, mask, types = batch(name)
    with torch.no_grad():
        expected = native(ids, mask, types).logits
        got = loaded.eval()(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    if task_type == "regression":
        got = got.view(-1)
    valid = mask.bool() if task_type == "token_classification" else slice(None)
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=0)
    if task_type != "regression":  # the same predicted labels
        assert torch.equal(got[valid].argmax(-1), expected[valid].argmax(-1))
    # and back: the exported directory loads here to the same tensors
    again = load_task_model(tmp_path / "out")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in native.state_dict().items())
