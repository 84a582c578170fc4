"""Start-up warnings for settings that make little sense together: each found, each naming the key and the fix."""

from __future__ import annotations

from pretrain.run.sanity import sanity_warnings


def test_scaled_down_cluster_settings_warn_once_each():
    found = sanity_warnings(warmup_steps=10000, max_steps=200, accelerator="cpu", precision="bf16-mixed",
                            num_workers=4, cuda_available=False, cpu_count=2)
    assert len(found) == 3
    assert "optim.warmup_steps=10000 >= trainer.max_steps=200" in found[0]
    assert "trainer.precision=bf16-mixed on a CPU" in found[1] and "32-true" in found[1]
    assert "data.num_workers=4 > 2 CPU cores" in found[2] and "data.num_workers=1" in found[2]


def test_sensible_settings_are_quiet():
    assert sanity_warnings(warmup_steps=50, max_steps=800, accelerator="cpu", precision="32-true", num_workers=0,
                           cuda_available=False, cpu_count=2) == []
    # auto on a GPU machine: bf16 is what it should be
    assert sanity_warnings(warmup_steps=10000, max_steps=1000000, accelerator="auto", precision="bf16-mixed",
                           num_workers=8, cuda_available=True, cpu_count=16) == []
    # max_steps=0 (export the starting model) trains nothing: no warm-up to speak of
    assert sanity_warnings(warmup_steps=10000, max_steps=0, accelerator="auto", precision="bf16-mixed",
                           num_workers=2, cuda_available=True, cpu_count=16) == []


def test_a_generator_checkpoint_without_a_generator_is_named():
    found = sanity_warnings(warmup_steps=50, max_steps=800, accelerator="cpu", precision="32-true", num_workers=0,
                            cuda_available=False, cpu_count=2, objective="mlm", init_generator_from="ckpt/hf_generator")
    assert found == ["model.init_generator_from=ckpt/hf_generator is not used by objective=mlm (only replaced-token "
                     "detection has a generator): remove it, or use objective=rtd"]
    assert sanity_warnings(warmup_steps=50, max_steps=800, accelerator="cpu", precision="32-true", num_workers=0,
                           cuda_available=False, cpu_count=2, objective="rtd",
                           init_generator_from="ckpt/hf_generator") == []
