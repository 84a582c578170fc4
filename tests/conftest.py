"""Test-wide settings: no network for wandb, deterministic torch, one intra-op thread.

One thread, in this process and in every process a test starts (OMP_NUM_THREADS, unless a test sets it): the
suite's models are tiny, and on a 2-core machine that is busy with anything else (a rank the test started, another
job) torch's second intra-op thread spin-waits for a core and made single tests up to 60 times slower."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
if not torch.cuda.is_available():  # Triton kernels run in Triton's CPU interpreter (set before they are defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _restore_torch_defaults():
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """Packed shards (seq_len 64) of the bundled English sample with a small SentencePiece tokenizer, made by the
    real `python -m data_prep shards` command."""
    import subprocess
    import sys
    from pathlib import Path

    from shard_helpers import sample_documents, train_spm_tokenizer, write_jsonl

    root = tmp_path_factory.mktemp("train_data")
    docs = sample_documents("en")
    tokenizer = train_spm_tokenizer(root / "tok", docs, vocab_size=1000)
    corpus = write_jsonl(root / "corpus.jsonl", docs)
    subprocess.run([sys.executable, "-m", "data_prep", "shards", "--input", str(corpus), "--tokenizer", str(tokenizer),
                    "--out", str(root / "shards"), "--seq-len", "64", "--workers", "1"],
                   check=True, capture_output=True, cwd=Path(__file__).resolve().parents[1])
    return root / "shards"


@pytest.fixture(scope="session")
def split_shards(shards, tmp_path_factory):
    """(train, val) shard directories of the same corpus and tokenizer as ``shards``, split by document with the
    real `python -m data_prep shards --val-fraction 0.1` (the validation set lands in OUT/val)."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path_factory.mktemp("split_data") / "shards"
    subprocess.run([sys.executable, "-m", "data_prep", "shards", "--input", str(shards.parent / "corpus.jsonl"),
                    "--tokenizer", str(shards.parent / "tok"), "--out", str(out), "--seq-len", "64", "--workers", "1",
                    "--val-fraction", "0.1"], check=True, capture_output=True, cwd=Path(__file__).resolve().parents[1])
    return out, out / "val"


# --- the edit-loop tier: `make test-fast` runs `pytest -m "not slow"` ------------------------------------------------
# The tests below are marked `slow` here, in one place (a file, or a test with all its parameters). Together they are
# most of the suite's time; what is left still imports every module of pretrain/ and data_prep/ and exercises each
# (a cheaper test of the same area stays in). `make test` (CI) runs everything. A new test that takes more than a
# few seconds on the 2-core CI machine belongs in this list (`pytest --durations=25` shows the slowest).
SLOW = {
    "tests/test_slurm.py",
    "tests/test_elastic_zero.py",
    "tests/test_install.py",
    "tests/test_rtd_learning.py",
    "tests/test_probe_learning.py",
    "tests/test_gpu_check.py::test_dry_run_runs_every_stage_and_writes_json_and_markdown",
    "tests/test_gpu_check.py::test_dry_run_under_the_triton_of_gpu_images",
    "tests/test_gpu_check.py::test_a_kernel_that_fails_its_self_check_makes_our_step_rows_invalid",
    "tests/test_gpu_check.py::test_a_row_past_its_share_of_the_stage_says_so_and_the_next_row_runs",
    "tests/test_recovery.py::test_random_kills_resume_exactly",
    "tests/test_recovery.py::test_deepspeed_random_kills_resume_exactly_and_damaged_files_are_named",
    "tests/test_recovery.py::test_crafted_pickles_are_refused_and_run_nothing",
    "tests/test_recovery.py::test_second_launch_on_a_live_output_dir_changes_nothing_and_fails",
    "tests/test_recovery.py::test_full_disk_during_a_save_keeps_the_previous_checkpoint",
    "tests/test_deepspeed.py::test_zero_stage_matches_ddp_resumes_and_exports",
    "tests/test_triton_attention.py::test_whole_model_with_emd_matches_reference",
    "tests/test_triton_attention.py::test_compiled_dropout_follows_torch_seed",
    "tests/test_triton_attention.py::test_compiles_without_graph_breaks",
    "tests/test_triton_attention.py::test_memory_kept_for_backward_grows_linearly_with_length",
    "tests/test_mixtures.py::test_weighted_mixture_resumes_on_three_ranks_without_repeating_or_skipping",
    "tests/test_mixtures.py::test_global_batch_gives_the_same_losses_on_one_two_and_four_ranks",
    "tests/test_stages.py::test_two_then_three_ranks_across_a_stage_boundary_repeat_and_skip_nothing",
    "tests/test_train.py::test_small_experiments_run_a_few_steps_on_cpu",
    "tests/test_train.py::test_rtd_loss_falls_and_exports_load_in_transformers",
    "tests/test_train.py::test_interrupted_run_resumes_exactly",
    "tests/test_probe_watch.py::test_watch_killed_at_seeded_points_ends_with_each_row_once",
    "tests/test_probe_watch.py::test_report_draws_the_downstream_panel_with_baselines_and_overlays_runs",
    "tests/test_probe_watch.py::test_probe_sbatch_runs_the_watch",
    "tests/test_probe_watch.py::test_watch_a_deepspeed_run_reads_its_checkpoint_directories_and_nothing_else",
    "tests/test_loggers.py::test_wandb_offline_run_resumes_the_same_run",
    "tests/test_signals_and_export.py::test_sigterm_to_the_whole_group_saves_and_resumes_exactly",
    "tests/test_signals_and_export.py::test_sigterm_during_validation_keeps_that_evaluation",
    "tests/test_signals_and_export.py::test_export_keeps_a_users_directory_and_replaces_it_whole_only_when_asked",
    "tests/test_run_visibility.py::test_ctrl_c_saves_a_checkpoint_and_prints_the_resume_command",
    "tests/test_run_visibility.py::test_resumed_run_has_the_losses_of_an_uninterrupted_one",
    "tests/test_run_visibility.py::test_terminal_prints_each_message_once_and_a_summary",
    "tests/test_run_visibility.py::test_progress_bar_counts_to_max_steps_after_resume",
    "tests/test_run_visibility.py::test_report_draws_mlm_and_rtd_runs",
    "tests/test_checkpoint_trust.py",
    "tests/test_gpu_bench.py",
    "tests/test_loggers.py",
    "tests/test_triton_aot.py::test_aot_every_launchable_variant_compiles",
    "tests/test_triton_aot.py::test_aot_16bit_pinned_configs_do_not_spill_or_exceed_shared_memory",
    "tests/test_triton_aot.py::test_aot_sm90_forward_uses_wgmma",
    "tests/test_triton_aot.py::test_aot_every_position_term_combination_compiles_on_sm90",
    "tests/test_triton_aot.py::test_aot_compiles_with_the_triton_of_gpu_images",
    "tests/test_shards.py::test_killed_process_resumes_to_identical_output",
    "tests/test_shards.py::test_records_without_text_and_nul_files_are_refused_or_skipped_and_counted",
    "tests/test_attention_self_check.py::test_compiled_code_reads_the_planned_outcome",
    "tests/test_attention_self_check.py::test_training_run_records_the_fallback",
    "tests/test_attention_self_check.py::test_checks_are_per_configuration",
    "tests/test_attention_self_check.py::test_healthy_kernel_passes_and_auto_runs_it",
    "tests/test_attention_self_check.py::test_first_use_inside_compiled_code_runs_the_check_eagerly",
    "tests/test_live_shards.py::test_overwrite_under_a_live_run_is_refused_and_the_run_trains_on_what_it_checked",
    "tests/test_live_shards.py::test_a_manifest_entry_without_sha256_is_one_line_and_a_dead_hash_check_never_hangs",
    "tests/test_live_shards.py::test_a_shard_truncated_under_a_live_run_stops_it_with_one_line",
    "tests/test_run_identity.py::test_tokenizer_swap_with_equal_counts_is_refused_unless_allowed",
    "tests/test_run_identity.py::test_reordered_sources_are_refused",
    "tests/test_run_identity.py::test_global_batch_is_compared_as_its_effective_value_both_ways",
    "tests/test_run_identity.py::test_export_refuses_a_tokenizer_the_checkpoint_was_not_trained_with",
    "tests/test_train.py::test_mlm_run_exports_a_fill_mask_model",
    "tests/test_signals_and_export.py::test_ctrl_c_twice_stops_at_once_with_the_projects_line",
    "tests/test_continue.py::test_zh_max_steps_0_reproduces_and_exports_the_source",
    "tests/test_continue.py::test_zh_loss_falls_and_fill_mask_matches_native",
    "tests/test_continue.py::test_ko_derived_generator_starts_exactly_and_loss_falls",
    "tests/test_continue.py::test_vocabulary_extension_keeps_old_tokens",
    "tests/test_console_noise.py",
    "tests/test_command_line.py::test_a_run_with_a_trainer_argument_the_config_lacks_and_the_tokenizers_vocab_size",
    "tests/test_lr_extension.py::test_extension_continues_the_lr",
    "tests/test_step_numbers.py::test_extension_after_a_validation_on_the_last_step_numbers_every_output_alike",
    "tests/test_long_context.py::test_triton_kernel_matches_reference_at_2048",
    "tests/test_long_context.py::test_tiny_model_trains_at_2048_on_cpu",
    "tests/test_long_context.py::test_continue_a_512_checkpoint_at_2048",
    "tests/test_one_line_errors.py::test_bad_input_gives_one_clear_line[misspelt_trainer_argument]",
    # single cases of the one-line-errors test (each a command-line launch); every area keeps cases in the tier
    "tests/test_one_line_errors.py::test_bad_input_gives_one_clear_line[resume_with_only_an_empty_sha256]",
    "tests/test_one_line_errors.py::test_bad_input_gives_one_clear_line[allow_changes_naming_nothing]",
    "tests/test_one_line_errors.py::test_bad_input_gives_one_clear_line[probe_watch_a_file]",
    "tests/test_one_line_errors.py::test_bad_input_gives_one_clear_line[export_into_a_non_empty_hf]",
    "tests/test_one_line_errors.py::test_bad_input_gives_one_clear_line[allow_changes_of_the_micro_batch]",
    "tests/test_one_line_errors.py::test_bad_input_gives_one_clear_line[export_with_a_binary_sha256]",
    "tests/test_one_line_errors.py::test_bad_input_gives_one_clear_line[probe_model_without_tokenizer]",
    "tests/test_one_line_errors.py::test_bad_input_gives_one_clear_line[probe_released_fine_tune_without_tokenizer]",
    "tests/test_one_line_errors.py::test_bad_input_gives_one_clear_line[probe_a_model_that_is_not_deberta_v2]",
    "tests/test_lr_schedules.py::test_cooldown_equals_a_run_that_decayed_there",
    "tests/test_one_line_errors.py::test_bad_input_gives_one_clear_line[cooldown_of_a_linear_run]",
}


# --- two workers: `make test` runs `pytest -n 2 --dist loadfile --no-loadscope-reorder` -----------------------------
# Each test file runs whole on one worker (its module-scoped fixtures are built once, not once per worker). Under
# pytest-xdist (only there: a plain `pytest tests/x.py` keeps its order and one process) the files are ordered by
# their cost below, most expensive first, so that the two workers start the long files early and finish together.
# COSTS holds rough seconds on an idle 2-core machine, per test (a file's key is each of its tests, a test's key each
# of its parameters), for the tests that take over ~10 s there (`--durations=25` shows them); a test not listed
# counts 5 s if it is marked slow and 1 s otherwise. Wrong numbers cost only balance, never a result. (Not
# `--dist loadgroup`: pytest-xdist 3.8 names a test's group by rewriting its node id, which pytest 9 ignores.)
COSTS = {
    "tests/test_recovery.py::test_deepspeed_random_kills_resume_exactly_and_damaged_files_are_named": 130,
    "tests/test_rtd_learning.py::test_discriminator_with_labels_detached_from_the_replacements_does_not_pass": 90,
    "tests/test_gpu_check.py::test_dry_run_under_the_triton_of_gpu_images": 75,
    "tests/test_gpu_check.py::test_dry_run_runs_every_stage_and_writes_json_and_markdown": 75,
    "tests/test_slurm.py": 60,
    "tests/test_rtd_learning.py::test_discriminator_learns_beyond_the_base_rate": 55,
    "tests/test_recovery.py::test_random_kills_resume_exactly": 65,
    "tests/test_mixtures.py::test_weighted_mixture_resumes_on_three_ranks_without_repeating_or_skipping": 50,
    "tests/test_train.py::test_rtd_loss_falls_and_exports_load_in_transformers": 35,
    "tests/test_probe_watch.py::test_watch_killed_at_seeded_points_ends_with_each_row_once": 35,
    "tests/test_train.py::test_small_experiments_run_a_few_steps_on_cpu": 27,
    "tests/test_triton_attention.py::test_whole_model_with_emd_matches_reference": 20,
    "tests/test_train.py::test_mlm_run_exports_a_fill_mask_model": 25,
    "tests/test_elastic_zero.py::test_zero_run_resumes_on_three_ranks": 18,
    "tests/test_run_visibility.py::test_ctrl_c_saves_a_checkpoint_and_prints_the_resume_command": 25,
    "tests/test_train.py::test_interrupted_run_resumes_exactly": 20,
    "tests/test_probe_cli.py::test_probe_a_run_resume_and_export": 16,
    "tests/test_deepspeed.py::test_zero_stage_matches_ddp_resumes_and_exports": 13,
    "tests/test_loggers.py::test_wandb_offline_run_resumes_the_same_run": 16,
    "tests/test_run_identity.py::test_tokenizer_swap_with_equal_counts_is_refused_unless_allowed": 17,
    "tests/test_signals_and_export.py::test_sigterm_to_the_whole_group_saves_and_resumes_exactly": 20,
    "tests/test_signals_and_export.py::test_sigterm_during_validation_keeps_that_evaluation": 14,
    "tests/test_gpu_bench.py::test_cpu_smoke_run_writes_rows_check_and_table": 14,
    "tests/test_recovery.py::test_crafted_pickles_are_refused_and_run_nothing": 17,
    "tests/test_recovery.py::test_full_disk_during_a_save_keeps_the_previous_checkpoint": 16,
    "tests/test_triton_aot.py::test_aot_every_launchable_variant_compiles": 12,
    "tests/test_gpu_check.py::test_a_kernel_that_fails_its_self_check_makes_our_step_rows_invalid": 11,
    "tests/test_shards.py::test_killed_process_resumes_to_identical_output": 11,
    "tests/test_signals_and_export.py::test_export_keeps_a_users_directory_and_replaces_it_whole_only_when_asked": 11,
    "tests/test_mixtures.py::test_global_batch_gives_the_same_losses_on_one_two_and_four_ranks": 10,
    "tests/test_install.py": 10,
    "tests/test_long_context.py::test_triton_kernel_matches_reference_at_2048": 45,
    "tests/test_probe_watch.py::test_watch_a_deepspeed_run_reads_its_checkpoint_directories_and_nothing_else": 40,
    "tests/test_step_numbers.py::test_extension_after_a_validation_on_the_last_step_numbers_every_output_alike": 25,
    "tests/test_lr_schedules.py::test_cooldown_equals_a_run_that_decayed_there": 18,
    "tests/test_lr_schedules.py::test_cooldown_from_a_deepspeed_checkpoint_equals_a_deepspeed_run_that_decayed_there": 20,
    "tests/test_long_context.py::test_tiny_model_trains_at_2048_on_cpu": 12,
    "tests/test_stages.py::test_two_then_three_ranks_across_a_stage_boundary_repeat_and_skip_nothing": 22,
}


def _cost(nodeid: str, slow: bool) -> float:
    path, _, name = nodeid.partition("::")
    for key in (nodeid, f"{path}::{name.split('[')[0]}", path):
        if key in COSTS:
            return COSTS[key]
    return 5.0 if slow else 1.0


def pytest_collection_modifyitems(config, items):
    _mark_slow(items)
    if hasattr(config, "workerinput"):  # a pytest-xdist worker (its environment reaches a nested pytest too)
        _order_files_by_cost(items)


def _order_files_by_cost(items):
    """The most expensive file first; inside a file the tests keep their order."""
    cost = {}
    for item in items:
        path = item.nodeid.partition("::")[0]
        cost[path] = cost.get(path, 0.0) + _cost(item.nodeid, item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: -cost[item.nodeid.partition("::")[0]])  # stable: a file's tests stay together


def _mark_slow(items):
    modules = {}
    for item in items:
        path, _, name = item.nodeid.partition("::")
        modules.setdefault(path, item.module)
        if path in SLOW or f"{path}::{name.split('[')[0]}" in SLOW or item.nodeid in SLOW:
            item.add_marker(pytest.mark.slow)
    # a renamed or removed test must not leave the list quietly (its replacement would land in the fast tier)
    stale = [entry for entry in SLOW if "::" in entry and entry.split("::")[0] in modules
             and not hasattr(modules[entry.split("::")[0]], entry.split("::")[1].split("[")[0])]
    if stale:
        raise pytest.UsageError(f"tests/conftest.py SLOW names tests that do not exist: {', '.join(sorted(stale))}")


# --- the suite's cost per file: PYTEST_FILE_COSTS=1 (CI sets it) prints it after the run ------------------------------
# Setup, call and teardown seconds summed per test file as the runner received them (also from xdist workers): the
# table behind the README's test-suite cost and the COSTS above, without `--durations=0`'s line per test.
_FILE_COSTS: dict[str, list[float]] = {}


def pytest_runtest_logreport(report):
    if os.environ.get("PYTEST_FILE_COSTS") and not os.environ.get("PYTEST_XDIST_WORKER"):
        row = _FILE_COSTS.setdefault(report.nodeid.partition("::")[0], [0, 0.0, 0.0, 0.0])
        row[0] += report.when == "call"
        row[{"setup": 1, "call": 2, "teardown": 3}[report.when]] += report.duration


def pytest_terminal_summary(terminalreporter):
    if not _FILE_COSTS:
        return
    write = terminalreporter.write_line
    terminalreporter.section("cost per test file (seconds, summed over the workers)")
    write(f"| {'file':<34} | tests | setup s | call s | total s |")
    write(f"|{'-' * 36}|-------|---------|--------|---------|")
    total = [0, 0.0, 0.0, 0.0]
    for path, row in sorted(_FILE_COSTS.items(), key=lambda kv: -sum(kv[1][1:])):
        name = path.removeprefix("tests/")
        write(f"| {name:<34} | {row[0]:>5} | {row[1]:>7.0f} | {row[2]:>6.0f} | {sum(row[1:]):>7.0f} |")
        total = [a + b for a, b in zip(total, row)]
    write(f"| {'all':<34} | {total[0]:>5} | {total[1]:>7.0f} | {total[2]:>6.0f} | {sum(total[1:]):>7.0f} |")
