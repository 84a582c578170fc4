"""Low-severity faults found by probing the command lines with bad inputs: each must end in one clear error line
(naming the file, key or value and what to do), exit non-zero, and print no traceback.

Each case is a function ``case(tmp_path, shards) -> Case`` that prepares its bad input under ``tmp_path`` and
says which command to run and what the error line must contain. Cases are grouped by the part of the project that
reads the input; every group is one list, and the test below is parametrised over all of them."""

import functools
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    argv: list[str]              # arguments after ``python``, e.g. ["-m", "pretrain.export", ckpt, out]
    expect: str                  # a substring of the one error line
    env: dict = field(default_factory=dict)
    timeout: float = 300


# --- checkpoints and their checksums ---------------------------------------------------------------------------

def _checkpoint_with_sidecar(tmp_path: Path, sidecar: bytes) -> Path:
    """A small checkpoint file written as training writes it, whose ``.sha256`` is then replaced by ``sidecar``."""
    import torch

    from pretrain.checkpointing.files import checksum_path, save_atomic

    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    save_atomic({"global_step": 4, "state_dict": {"w": torch.ones(3)}}, checkpoint)
    checksum_path(checkpoint).write_bytes(sidecar)
    return checkpoint


def export_with_an_empty_sha256(tmp_path, shards):
    checkpoint = _checkpoint_with_sidecar(tmp_path, b"")
    return Case(["-m", "pretrain.export", str(checkpoint), str(tmp_path / "out")],
                f"{checkpoint}: its checksum file last.ckpt.sha256 is damaged (empty)")


def export_with_a_binary_sha256(tmp_path, shards):
    checkpoint = _checkpoint_with_sidecar(tmp_path, b"\xff\xfe\x00garbage")
    return Case(["-m", "pretrain.export", str(checkpoint), str(tmp_path / "out")],
                f"{checkpoint}: its checksum file last.ckpt.sha256 is damaged (not text)")


def resume_with_only_an_empty_sha256(tmp_path, shards):
    checkpoint = _checkpoint_with_sidecar(tmp_path, b"")
    run = checkpoint.parent.parent
    return Case(["-m", "pretrain", "+experiment=quickstart", "objective=mlm", f"data.path={shards}",
                 f"output_dir={run}", "trainer.max_steps=6", "data.num_workers=0", "model.vocab_size=1024",
                 "model.max_position_embeddings=64", "export_hf=false"],
                f"{run} holds checkpoints but none can be resumed")


_HELD_LOCKS: list[int] = []  # conversion locks this process holds while a case runs (released at exit)


def reshard_while_another_converts(tmp_path, shards):
    """A second `pretrain.reshard` of a checkpoint that another process is converting: refused at once, before
    anything of the other's is touched."""
    import fcntl

    import torch

    checkpoint = (tmp_path / "step-00000002.ckpt").resolve()
    (checkpoint / "checkpoint").mkdir(parents=True)
    torch.save({"global_step": 2, "dp_world_size": 1}, checkpoint / "checkpoint" / "mp_rank_00_model_states.pt")
    (checkpoint / "latest").write_text("checkpoint")
    fd = os.open(checkpoint / ".universal.lock", os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
    _HELD_LOCKS.append(fd)
    return Case(["-m", "pretrain.reshard", str(checkpoint)], f"{checkpoint}: pid {os.getpid()} is converting it now")


CHECKPOINT_CASES: list = [export_with_an_empty_sha256, export_with_a_binary_sha256, resume_with_only_an_empty_sha256,
                          reshard_while_another_converts]

# --- the run record, resume and export -------------------------------------------------------------------------
def allow_changes_naming_nothing(tmp_path, shards):
    """A typo in resume.allow_changes used to allow nothing, silently."""
    return Case(["-m", "pretrain", "+experiment=quickstart", f"data.path={shards}", f"output_dir={tmp_path / 'run'}",
                 "resume.allow_changes=[optim.lrr]"], "resume.allow_changes: optim.lrr is not a setting the resume")


def allow_changes_of_the_micro_batch(tmp_path, shards):
    """data.batch_size is no longer compared on its own: the effective global batch is."""
    return Case(["-m", "pretrain", "+experiment=quickstart", f"data.path={shards}", f"output_dir={tmp_path / 'run'}",
                 "resume.allow_changes=[data.batch_size]"], "compared as data.global_batch_size")


def keep_no_checkpoints(tmp_path, shards):
    """keep_checkpoints=0 would delete every step checkpoint as it is written."""
    return Case(["-m", "pretrain", "+experiment=quickstart", f"data.path={shards}", f"output_dir={tmp_path / 'run'}",
                 "keep_checkpoints=0"], "keep_checkpoints=0: how many step checkpoints to keep")


RUN_CASES: list = [allow_changes_naming_nothing, allow_changes_of_the_micro_batch, keep_no_checkpoints]

# --- shard sets, manifests and data_prep -----------------------------------------------------------------------
def _edited_manifest(tmp_path: Path, shards: Path, edit) -> Path:
    """A copy of the ``shards`` set whose manifest went through ``edit(manifest)``."""
    import json
    import shutil

    copy = Path(shutil.copytree(shards, tmp_path / "shards"))
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _inspect(directory: Path) -> list[str]:
    return ["-m", "data_prep", "inspect", str(directory), "--num", "0"]


def _shards_args(shards: Path, inputs: str, out: Path) -> list[str]:
    return ["-m", "data_prep", "shards", "--input", inputs, "--tokenizer", str(shards.parent / "tok"), "--out",
            str(out), "--seq-len", "64", "--workers", "1"]


def manifest_without_a_key(tmp_path, shards):
    copy = _edited_manifest(tmp_path, shards, lambda m: m["tokenizer"].pop("vocab_size"))
    return Case(_inspect(copy), "manifest.json: tokenizer.vocab_size is missing, expected a whole number >= 0")


def manifest_of_the_wrong_type(tmp_path, shards):
    copy = _edited_manifest(tmp_path, shards, lambda m: m.update(shards={"shard-00000.bin": 1}))
    return Case(_inspect(copy), "manifest.json: shards is {'shard-00000.bin': 1} (dict), expected a list")


def manifest_count_as_a_string(tmp_path, shards):  # was "1368 sequences != manifest 1368"
    def edit(manifest):
        manifest["shards"][0]["sequences"] = str(manifest["shards"][0]["sequences"])
    copy = _edited_manifest(tmp_path, shards, edit)
    return Case(_inspect(copy), "manifest.json: shards[0].sequences is '")


def manifest_null_sha256(tmp_path, shards):  # killed the background sha256 thread; the run then hung
    copy = _edited_manifest(tmp_path, shards, lambda m: m["shards"][0].update(sha256=None))
    return Case(_inspect(copy), "manifest.json: shards[0].sha256 is None (NoneType), expected 64 hex digits")


def fifo_as_a_shard(tmp_path, shards):  # hung for ever, holding the shard set's lock
    import shutil

    copy = Path(shutil.copytree(shards, tmp_path / "shards"))
    (copy / "shard-00000.bin").unlink()
    os.mkfifo(copy / "shard-00000.bin")
    return Case(["-m", "pretrain", "+experiment=quickstart", f"data.path={copy}", f"output_dir={tmp_path / 'run'}",
                 "model.vocab_size=1024", "model.max_position_embeddings=64", "trainer.max_steps=2"],
                f"shard {copy / 'shard-00000.bin'} is not a regular file (a FIFO", timeout=120)


def fifo_as_an_input(tmp_path, shards):  # hung for ever, holding the output directory's lock
    os.mkfifo(tmp_path / "corpus.txt")
    return Case(_shards_args(shards, str(tmp_path / "corpus.txt"), tmp_path / "out"),
                f"{tmp_path / 'corpus.txt'} is not a regular file (a FIFO", timeout=120)


def out_is_the_input(tmp_path, shards):
    import shutil

    (tmp_path / "corpus").mkdir()
    shutil.copy(shards.parent / "corpus.jsonl", tmp_path / "corpus")
    return Case(_shards_args(shards, str(tmp_path / "corpus"), tmp_path / "corpus"),
                f"--out {tmp_path / 'corpus'} is the input {tmp_path / 'corpus'}")


def out_inside_the_input(tmp_path, shards):
    import shutil

    (tmp_path / "corpus").mkdir()
    shutil.copy(shards.parent / "corpus.jsonl", tmp_path / "corpus")
    return Case(_shards_args(shards, str(tmp_path / "corpus"), tmp_path / "corpus" / "shards"),
                f"--out {tmp_path / 'corpus' / 'shards'} lies inside the input {tmp_path / 'corpus'}")


DATA_CASES: list = [manifest_without_a_key, manifest_of_the_wrong_type, manifest_count_as_a_string,
                    manifest_null_sha256, fifo_as_a_shard, fifo_as_an_input, out_is_the_input, out_inside_the_input]

# --- signals, export directories and concurrent tools ----------------------------------------------------------
@functools.cache
def _one_step_checkpoint(shards: Path) -> Path:
    """A 1-step checkpoint of a tiny run (trained once per session, beside the session's shards)."""
    from hydra import compose, initialize_config_dir

    from pretrain.train import train

    run = shards.parent / "one_line_errors_signal_run"
    overrides = ["+experiment=quickstart", "objective=mlm", f"data.path={shards}", f"output_dir={run}",
                 "trainer.max_steps=1", "data.batch_size=4", "data.num_workers=0", "model.vocab_size=1024",
                 "model.max_position_embeddings=64", "model.position_buckets=16", "checkpoint_every_n_steps=1",
                 "export_hf=false", "report=false"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        train(compose(config_name="config", overrides=overrides))
    return run / "checkpoints" / "step-00000001.ckpt"


def export_into_a_non_empty_hf(tmp_path, shards):
    (tmp_path / "out" / "hf").mkdir(parents=True)
    (tmp_path / "out" / "hf" / "notes.txt").write_text("mine\n")
    return Case(["-m", "pretrain.export", str(_one_step_checkpoint(shards)), str(tmp_path / "out")],
                f"{tmp_path / 'out' / 'hf'}: exists and is not empty; pass --overwrite")


def export_onto_a_full_disk_names_the_destination(tmp_path, shards):
    """No room for the weights (a file size limit stands in for a full disk: no mount needed); the line names OUT/hf,
    where space is missing, not a file the export was reading."""
    limited = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536)); sys.argv = ['pretrain.export', *sys.argv[1:]]; "
               "runpy.run_module('pretrain.export', run_name='__main__', alter_sys=True)")
    return Case(["-c", limited, str(_one_step_checkpoint(shards)), str(tmp_path / "out")],
                f"{tmp_path / 'out' / 'hf'}: File too large")


SIGNAL_CASES: list = [export_into_a_non_empty_hf, export_onto_a_full_disk_names_the_destination]

# --- downstream probes: task files, data files, model directories ----------------------------------------------
def _probe_model(tmp_path, shards, tokenizer=True):
    """A tiny exported model directory (with the shards' tokenizer unless ``tokenizer`` is False)."""
    import torch

    from pretrain import hf
    from pretrain.model import DebertaConfig, DebertaForMaskedLM

    torch.manual_seed(0)
    config = DebertaConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=128, position_buckets=16)
    return hf.save_pretrained(DebertaForMaskedLM(config), tmp_path / "model",
                              tokenizer=shards.parent / "tok" if tokenizer else None)


def _probe_task(tmp_path, train='{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n',
                dev='{"text": "fine", "label": "pos"}\n', body=None):
    (tmp_path / "train.jsonl").write_text(train, encoding="utf-8")
    (tmp_path / "dev.jsonl").write_text(dev, encoding="utf-8")
    task = tmp_path / "task.yaml"
    task.write_text(body if body is not None else "name: t\ntype: classification\ntrain: train.jsonl\n"
                    "dev: dev.jsonl\n", encoding="utf-8")
    return task


def _probe(tmp_path, shards, task, **model_options):
    return ["-m", "pretrain.probe", str(_probe_model(tmp_path, shards, **model_options)), "--task", str(task),
            "--out", str(tmp_path / "out"), "--seeds", "1"]


def probe_missing_column(tmp_path, shards):
    task = _probe_task(tmp_path, train='{"review": "good", "label": "pos"}\n{"review": "bad", "label": "neg"}\n')
    return Case(_probe(tmp_path, shards, task), "column(s) ['text'] not found")


def probe_label_outside_list(tmp_path, shards):
    task = _probe_task(tmp_path, dev='{"text": "fine", "label": "neutral"}\n')
    return Case(_probe(tmp_path, shards, task), "dev.jsonl: row 1: label 'neutral' is not in the label list")


def probe_empty_file(tmp_path, shards):
    task = _probe_task(tmp_path, dev="")
    return Case(_probe(tmp_path, shards, task), "dev.jsonl: the file is empty")


def probe_task_file_does_not_parse(tmp_path, shards):
    task = _probe_task(tmp_path, body="name: t\ntype: [classification\ntrain: train.jsonl\n")
    return Case(_probe(tmp_path, shards, task), "task.yaml: not a valid YAML task file")


def probe_model_without_tokenizer(tmp_path, shards):
    return Case(_probe(tmp_path, shards, _probe_task(tmp_path), tokenizer=False), "no tokenizer files")


def probe_watch_a_file(tmp_path, shards):
    (tmp_path / "run.ckpt").write_bytes(b"not a run directory")
    return Case(["-m", "pretrain.probe", "--watch", str(tmp_path / "run.ckpt"), "--task", str(_probe_task(tmp_path)),
                 "--out", str(tmp_path / "out")], "run.ckpt: --watch needs a run directory")


def _released(directory, model, shards, tokenizer=True):
    """``model`` saved as transformers releases a fine-tune (``save_pretrained``), with the shards' tokenizer."""
    import transformers

    model.save_pretrained(directory)
    if tokenizer:
        transformers.AutoTokenizer.from_pretrained(shards.parent / "tok").save_pretrained(directory)
    return directory


def probe_released_fine_tune_without_tokenizer(tmp_path, shards):
    """A released DebertaV2 fine-tune passes the config check; the missing tokenizer is what is named."""
    import transformers

    config = transformers.DebertaV2Config(vocab_size=1000, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=64, max_position_embeddings=128, relative_attention=True,
                                          position_buckets=16, pos_att_type=["p2c", "c2p"], cls_dropout=0.1)
    model = _released(tmp_path / "fine_tune", transformers.DebertaV2ForSequenceClassification(config), shards,
                      tokenizer=False)
    return Case(["-m", "pretrain.probe", str(model), "--task", str(_probe_task(tmp_path)), "--out",
                 str(tmp_path / "out"), "--seeds", "1"], f"{model}: no tokenizer files")


def probe_a_model_that_is_not_deberta_v2(tmp_path, shards):
    import transformers

    config = transformers.BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64)
    model = _released(tmp_path / "bert", transformers.BertForSequenceClassification(config), shards)
    return Case(["-m", "pretrain.probe", str(model), "--task", str(_probe_task(tmp_path)), "--out",
                 str(tmp_path / "out"), "--seeds", "1"], "field 'model_type' = 'bert': only 'deberta-v2' checkpoints")


PROBE_CASES: list = [probe_missing_column, probe_label_outside_list, probe_empty_file, probe_task_file_does_not_parse,
                     probe_model_without_tokenizer, probe_watch_a_file, probe_released_fine_tune_without_tokenizer,
                     probe_a_model_that_is_not_deberta_v2]

# --- a newcomer's command lines ---------------------------------------------------------------------------------
def _pretrain(tmp_path, shards, *overrides):
    return ["-m", "pretrain", "+experiment=quickstart", f"data.path={shards}", f"output_dir={tmp_path / 'run'}",
            *overrides]


def misspelt_keys_named_together(tmp_path, shards):
    """Hydra named only the first and advised `+data.batchsize=8`, which adds the misspelling."""
    return Case(_pretrain(tmp_path, shards, "data.batchsize=8", "optim.lr_rate=1"),
                "data.batchsize: no such setting (did you mean data.batch_size?); "
                "optim.lr_rate: no such setting (did you mean optim.lr")


def misspelt_trainer_argument(tmp_path, shards):
    return Case(_pretrain(tmp_path, shards, "+trainer.max_step=3"),
                "trainer.max_step: neither a setting nor a lightning.Trainer argument (did you mean trainer.max_steps")


def misspelt_config_choice(tmp_path, shards):
    return Case(_pretrain(tmp_path, shards, "model=tinny"), "model=tinny: no such model config in conf/model/ "
                                                            "(did you mean tiny?)")


NEWCOMER_CASES: list = [misspelt_keys_named_together, misspelt_trainer_argument, misspelt_config_choice]

# --- learning-rate schedules and cool-downs --------------------------------------------------------------------
def misspelt_schedule(tmp_path, shards):
    return Case(_pretrain(tmp_path, shards, "optim.schedule=cosin"),
                "optim.schedule='cosin': choose linear, cosine, wsd (did you mean cosine?)")


def wsd_decay_longer_than_the_run(tmp_path, shards):
    return Case(_pretrain(tmp_path, shards, "optim.schedule=wsd", "optim.decay_steps=900"),
                "optim.decay_steps=900: the wsd decay phase is longer than the steps after warm-up (trainer.max_steps="
                "800 - optim.warmup_steps=50 = 750)")


def cooldown_of_a_linear_run(tmp_path, shards):
    checkpoint = _one_step_checkpoint(shards)
    return Case(["-m", "pretrain.cooldown", str(checkpoint), "--out", str(tmp_path / "cooled"), "--decay-steps", "2"],
                f"{checkpoint} (step 1) comes from a run with optim.schedule=linear: a cool-down starts the decay of a "
                "warmup-stable-decay run")


def cooldown_into_its_source(tmp_path, shards):
    checkpoint = _one_step_checkpoint(shards)
    run = checkpoint.parent.parent
    return Case(["-m", "pretrain.cooldown", str(checkpoint), "--out", str(run), "--decay-steps", "2"],
                f"--out {run}: is the source run {run}; a cool-down writes into a new directory of its own")


SCHEDULE_CASES: list = [misspelt_schedule, wsd_decay_longer_than_the_run, cooldown_of_a_linear_run,
                        cooldown_into_its_source]

# --- sequence-length stages and the batch-size warm-up ----------------------------------------------------------
def stage_length_the_shards_cannot_serve(tmp_path, shards):
    return Case(_pretrain(tmp_path, shards, "data.stages=[{seq_len:48,steps:2},{seq_len:64}]"),
                "data.stages[0].seq_len=48 neither divides nor is a multiple of the shards' length 64")


def stage_micro_batch_not_whole(tmp_path, shards):
    return Case(_pretrain(tmp_path, shards, "data.batch_size=1", "data.stages=[{seq_len:32,steps:2},{seq_len:128}]"),
                "data.stages[1].seq_len=128 with data.stage_batch=tokens: a micro-batch of 1 sequence(s) of 64 tokens "
                "is 0.5 sequences of 128, not a whole number")


def warmup_not_divisible_by_ranks_and_accumulation(tmp_path, shards):
    return Case(_pretrain(tmp_path, shards, "data.batch_size=4", "data.global_batch_size=16",
                          "data.batch_warmup={start:6,tokens:1000}"),
                "data.batch_warmup: start=6, increment=6 not divisible by ranks x accumulation = 4")


def stage_longer_than_the_position_table(tmp_path, shards):
    return Case(_pretrain(tmp_path, shards, "data.stages=[{seq_len:32,steps:2},{seq_len:256}]"),
                "data.stages[1].seq_len=256 is longer than model.max_position_embeddings=128")


def stage_without_steps_before_the_last(tmp_path, shards):
    return Case(_pretrain(tmp_path, shards, "data.stages=[{seq_len:32},{seq_len:64}]"),
                "data.stages[0] (seq_len 32) has no steps")


STAGE_CASES: list = [stage_length_the_shards_cannot_serve, stage_micro_batch_not_whole,
                     warmup_not_divisible_by_ranks_and_accumulation, stage_longer_than_the_position_table,
                     stage_without_steps_before_the_last]

ALL_CASES = (CHECKPOINT_CASES + RUN_CASES + DATA_CASES + SIGNAL_CASES + PROBE_CASES + NEWCOMER_CASES + SCHEDULE_CASES
             + STAGE_CASES)


def run_case(case: Case) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO), **case.env}
    return subprocess.run([sys.executable, *case.argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=case.timeout, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("make_case", ALL_CASES, ids=[c.__name__ for c in ALL_CASES])
def test_bad_input_gives_one_clear_line(make_case, tmp_path, shards):
    case = make_case(tmp_path, shards)
    result = run_case(case)
    assert result.returncode != 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and case.expect in errors[0], result.stderr[-3000:]
