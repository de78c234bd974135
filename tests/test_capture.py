"""capture_routing: what the router hooks count, what they leave out, and that they clean up."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from moe_finetune.errors import UnknownFamilyError
from moe_finetune.routing import RoutingCapture, capture_routing, compare_probes, probe_routing
from moe_finetune.routing.metrics import RoutingSums, overflow_assignments, summarise

# overflow is per forward (capacity is a per-batch budget), so it is compared separately
SUM_FIELDS = ("tokens", "assign_counts", "prob_sum", "entropy_sum", "z_sum")


def load(path: Path):
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
    model.config.use_cache = False
    return model.eval()


@pytest.fixture
def mixtral(tiny_mixtral_dir: Path):
    return load(tiny_mixtral_dir)


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(10, 1000, (batch, length), generator=generator)


def run_sums(model, **inputs) -> RoutingSums:
    with capture_routing(model) as cap, torch.no_grad():
        model(**inputs)
    return cap.sums


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def assert_sums_close(actual: RoutingSums, expected: RoutingSums, atol: float = 1e-4) -> None:
    for name in SUM_FIELDS:
        torch.testing.assert_close(
            getattr(actual, name), getattr(expected, name), atol=atol, rtol=1e-5, msg=name
        )


def test_hooks_are_removed_when_the_block_exits(mixtral):
    before = hook_count(mixtral)
    with capture_routing(mixtral) as cap:
        assert hook_count(mixtral) > before
        mixtral(input_ids=ids(1, 6))
    assert hook_count(mixtral) == before
    tokens = cap.sums.tokens.clone()
    mixtral(input_ids=ids(1, 6))  # a forward after exit changes nothing
    assert torch.equal(cap.sums.tokens, tokens)


def test_hooks_are_removed_when_the_block_raises(mixtral):
    before = hook_count(mixtral)
    with pytest.raises(RuntimeError, match="boom"), capture_routing(mixtral):
        raise RuntimeError("boom")
    assert hook_count(mixtral) == before


def test_every_token_is_counted_once_per_layer_with_k_assignments(mixtral):
    sums = run_sums(mixtral, input_ids=ids(2, 7))
    assert sums.tokens.tolist() == [14.0, 14.0]
    assert sums.assign_counts.sum(-1).tolist() == [28.0, 28.0]  # top-2
    torch.testing.assert_close(sums.prob_sum.sum(-1), sums.tokens)  # each probability row sums to 1


def test_stats_match_transformers_aux_loss_on_a_padded_batch(mixtral):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    with capture_routing(mixtral) as cap, torch.no_grad():
        out = mixtral(input_ids=ids(2, 9), attention_mask=mask, output_router_logits=True)
    expected = load_balancing_loss_func(out.router_logits, 8, 2, mask).item()
    stats = cap.stats()
    assert stats.aux_loss == pytest.approx(expected, rel=1e-5)
    assert stats.tokens == 14


def test_left_padding_and_packed_sequences_count_only_real_tokens(mixtral):
    a, b = ids(1, 6, seed=1), ids(1, 4, seed=2)
    separate = run_sums(mixtral, input_ids=a) + run_sums(mixtral, input_ids=b)

    left = torch.cat([a, torch.cat([torch.zeros(1, 2, dtype=torch.long), b], dim=1)])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = run_sums(mixtral, input_ids=left, attention_mask=mask, position_ids=positions)
    assert_sums_close(padded, separate)
    torch.testing.assert_close(padded.overflow, overflow_assignments(padded.assign_counts, 2))

    # packed: one row, positions restarting, no mask (use_cache=False keeps the sequences apart)
    packed = torch.cat([a, b], dim=1)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    assert_sums_close(run_sums(mixtral, input_ids=packed, position_ids=positions), separate)


def test_cached_decoding_counts_only_the_new_tokens(tiny_mixtral_dir):
    model = load(tiny_mixtral_dir)
    prompt = ids(1, 5)
    with torch.no_grad():
        past = model(input_ids=prompt, use_cache=True).past_key_values
        with capture_routing(model) as cap:
            model(
                input_ids=ids(1, 2, seed=3),
                attention_mask=torch.ones(1, 7, dtype=torch.long),
                past_key_values=past,
                use_cache=True,
            )
    assert cap.sums.tokens.tolist() == [2.0, 2.0]


def test_hooks_add_no_host_sync_to_a_forward(mixtral, monkeypatch):
    """The hooks queue tensor work only: no .item()/.tolist()/.cpu()/bool() of a tensor per forward."""
    assert_no_host_sync_added(mixtral, monkeypatch)


def test_hooks_add_no_host_sync_with_routers_on_two_devices(mixtral, monkeypatch):
    report_devices(monkeypatch, mixtral, [CPU, SECOND])
    assert_no_host_sync_added(mixtral, monkeypatch)


def assert_no_host_sync_added(mixtral, monkeypatch) -> None:
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 6:] = 0
    batch = {"input_ids": ids(2, 8), "attention_mask": mask}
    calls: list[str] = []
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    with torch.no_grad():
        mixtral(**batch)
        bare = len(calls)
        calls.clear()
        with capture_routing(mixtral):
            mixtral(**batch)
    assert len(calls) == bare, f"the capture added host syncs: {calls}"


def test_train_and_eval_forwards_are_both_counted_unless_train_only(mixtral):
    batch = {"input_ids": ids(1, 5)}
    with capture_routing(mixtral) as cap, torch.no_grad():
        mixtral.train()
        mixtral(**batch)
        mixtral.eval()
        mixtral(**batch)
    assert cap.sums.tokens.tolist() == [10.0, 10.0]
    with capture_routing(mixtral, train_only=True) as cap, torch.no_grad():
        mixtral(**batch)  # eval mode: ignored
    assert cap.sums.tokens.tolist() == [0.0, 0.0]


def test_overflow_is_counted_per_forward_at_the_capacity_factor(mixtral):
    first, second = ids(1, 8, seed=4), ids(1, 8, seed=5)
    with capture_routing(mixtral, capacity_factor=1.0) as cap, torch.no_grad():
        mixtral(input_ids=first)
        counts_first = cap.sums.assign_counts.clone()
        mixtral(input_ids=second)
    counts_second = cap.sums.assign_counts - counts_first
    expected = overflow_assignments(counts_first, 2, 1.0) + overflow_assignments(counts_second, 2, 1.0)
    torch.testing.assert_close(cap.sums.overflow, expected)
    assert cap.stats().capacity_factor == 1.0


def test_reset_starts_a_new_window_and_stats_are_python_numbers(mixtral):
    with capture_routing(mixtral) as cap, torch.no_grad():
        mixtral(input_ids=ids(1, 5))
        cap.reset()
        mixtral(input_ids=ids(1, 3))
        stats = cap.stats()
    assert stats.tokens == 3
    assert isinstance(stats.entropy, float) and 0.0 < stats.entropy <= 1.0
    assert stats.layer_names == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


def test_probe_reports_choices_without_touching_the_sums_or_modes(mixtral):
    mixtral.train()
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    batch = {"input_ids": ids(2, 6), "attention_mask": mask, "labels": ids(2, 6)}
    with capture_routing(mixtral) as cap:
        first = probe_routing(cap, batch)
        second = probe_routing(cap, batch)
        assert cap.sums.tokens.sum().item() == 0
    assert mixtral.training and all(m.training for m in mixtral.modules())
    assert first.topk.shape == (2, 12, 2)  # (layers, B*T rows, k)
    assert first.valid is not None and first.valid.sum().item() == 10
    assert first.counts.sum(-1).tolist() == [20.0, 20.0]  # padding rows excluded from the load
    drift = compare_probes(first, second)
    assert drift.topk_change == 0.0 and drift.load_js == 0.0
    with capture_routing(mixtral) as cap:
        chunked = probe_routing(
            cap, batch, chunk_rows=1
        )  # one sequence per forward: same answer, less memory
    assert torch.equal(chunked.topk, first.topk) and torch.equal(chunked.counts, first.counts)
    assert torch.equal(chunked.valid, first.valid)


def test_the_probe_gives_the_metrics_a_logging_window_of_the_same_rows_gives(mixtral):
    """The guard's baseline is the probe at train begin: its numbers must be those of a window over the
    same rows (entropy, load share, balance per layer), padding left out the same way."""
    mixtral.train()
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[2, 5:] = 0
    batch = {"input_ids": ids(3, 7, seed=3), "attention_mask": mask}
    with capture_routing(mixtral) as cap:
        probe = probe_routing(cap, batch, chunk_rows=2)
        assert cap.sums.tokens.sum().item() == 0  # the running sums stay untouched
    mixtral.eval()  # the probe routes in eval mode: so does the window it is compared with
    with capture_routing(mixtral) as cap, torch.no_grad():
        mixtral.model(**batch)
        window = cap.stats()
    assert probe.sums is not None
    measured = summarise(probe.sums)
    assert measured.tokens == window.tokens == 19
    assert measured.layer_entropy == pytest.approx(window.layer_entropy)
    assert torch.allclose(torch.tensor(measured.load_share), torch.tensor(window.load_share))
    assert measured.layer_balance == pytest.approx(window.layer_balance)
    assert measured.entropy == pytest.approx(window.entropy)
    assert probe.sums.assign_counts.tolist() == probe.counts.tolist()


def test_probe_sees_a_changed_router(mixtral):
    batch = {"input_ids": ids(2, 8)}
    with capture_routing(mixtral) as cap:
        start = probe_routing(cap, batch)
        with torch.no_grad():
            mixtral.model.layers[1].mlp.gate.weight.mul_(-1.0)
        drift = compare_probes(start, probe_routing(cap, batch))
    assert drift.layer_topk_change[0] == 0.0
    assert drift.layer_topk_change[1] > 0.5 and drift.topk_change == pytest.approx(
        drift.layer_topk_change[1] / 2
    )
    assert drift.layer_load_js[1] > 0.0


def test_non_finite_router_output_is_reported_not_raised(mixtral):
    with torch.no_grad():
        mixtral.model.layers[0].mlp.gate.weight[0, 0] = float("nan")
    with capture_routing(mixtral) as cap, torch.no_grad():
        mixtral(input_ids=ids(1, 4))
    stats = cap.stats()
    assert stats.finite is False
    assert stats.tokens == 4


def test_a_model_outside_the_family_table_is_refused_by_class_name():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    with pytest.raises(UnknownFamilyError, match="LlamaForCausalLM"):
        RoutingCapture(LlamaForCausalLM(config))


def test_a_family_model_without_routers_is_refused_by_class_name():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        mlp_only_layers=[0, 1],
    )
    with pytest.raises(UnknownFamilyError, match="Qwen2MoeForCausalLM.*no router"):
        capture_routing(Qwen2MoeForCausalLM(config)).__enter__()


def test_a_trainable_router_copy_shares_its_layer_slot(tiny_mixtral_dir):
    from moe_finetune.models.families import get_family
    from moe_finetune.models.lora import apply_lora
    from moe_finetune.sections import LoraSection

    batch = {"input_ids": ids(2, 6)}
    bare = run_sums(load(tiny_mixtral_dir), **batch)
    wrapped, _ = apply_lora(load(tiny_mixtral_dir), LoraSection(router=True), get_family("mixtral"))
    with capture_routing(wrapped.eval()) as cap, torch.no_grad():
        wrapped(**batch)
    assert cap.layer_names == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert_sums_close(cap.sums, bare)


# --------------------------------------------------------------------------- routers on several devices

CPU = torch.device("cpu")
# A second device key whose tensors are ordinary CPU tensors (torch.zeros(device="cpu:0") lives on
# "cpu"): this machine has one device, so the split of `device_map="auto"` is simulated by what the
# capture's device lookup reports.
SECOND = torch.device("cpu", 0)


def report_devices(monkeypatch, model, devices: list[torch.device]) -> None:
    """Make the capture's device lookup say that router i sits on devices[i]."""
    import moe_finetune.routing.capture as capture_module
    from moe_finetune.models.families import find_routers, get_family

    routers = [modules[0] for modules in find_routers(model, get_family("mixtral"))[1]]
    real = capture_module._module_device

    def lookup(module, fallback):
        for router, device in zip(routers, devices, strict=True):
            if module is router:
                return device
        return real(module, fallback)

    monkeypatch.setattr(capture_module, "_module_device", lookup)


def padded_batch() -> dict[str, torch.Tensor]:
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    return {"input_ids": ids(2, 9), "attention_mask": mask}


def test_routers_on_two_devices_keep_their_own_sums_combined_when_read(mixtral, monkeypatch):
    batch = padded_batch()
    with capture_routing(mixtral) as bare, torch.no_grad():
        mixtral(**batch)
        mixtral(**batch)
    report_devices(monkeypatch, mixtral, [CPU, SECOND])
    with capture_routing(mixtral) as cap, torch.no_grad():
        mixtral(**batch)
        mixtral(**batch)
        parts = cap.sums_by_device
        # each device holds only its own layer's rows: the hooks never added across devices
        assert set(parts) == {CPU, SECOND} and cap.device == CPU
        assert parts[CPU].tokens.tolist() == [28.0, 0.0] and parts[SECOND].tokens.tolist() == [0.0, 28.0]
        assert parts[CPU].assign_counts[1].abs().sum() == 0 and parts[SECOND].prob_sum[0].abs().sum() == 0

    sums = cap.sums  # combined on the first router's device, as a copy
    assert sums.device == CPU and sums.tokens.dtype == torch.float64
    assert_sums_close(sums, bare.sums)
    torch.testing.assert_close(sums.overflow, bare.sums.overflow)
    assert cap.stats().pooled() == pytest.approx(bare.stats().pooled(), rel=1e-6)

    # what the monitor does at a log: flatten, all_reduce (here: two identical ranks), unflatten, reset
    reduced = sums.from_tensor(sums.as_tensor() * 2)
    assert summarise(reduced).tokens == 56 and reduced.tokens.tolist() == [56.0, 56.0]
    cap.reset()
    assert all(part.as_tensor().abs().sum() == 0 for part in cap.sums_by_device.values())
    assert sums.tokens.tolist() == [28.0, 28.0]  # the copy read before the reset is untouched
    cap.load_sums(reduced)
    assert torch.equal(cap.sums.as_tensor(), reduced.as_tensor())
    assert cap.sums_by_device[SECOND].as_tensor().abs().sum() == 0


def test_the_drift_probe_works_with_routers_on_two_devices(mixtral, monkeypatch):
    batch = padded_batch()
    with capture_routing(mixtral) as cap:
        expected = probe_routing(cap, batch)
    report_devices(monkeypatch, mixtral, [CPU, SECOND])
    with capture_routing(mixtral) as cap:
        split = probe_routing(cap, batch)
        assert cap.sums.tokens.sum().item() == 0
    assert torch.equal(split.topk, expected.topk) and torch.equal(split.counts, expected.counts)


def test_a_router_whose_weights_are_not_on_a_device_adds_where_its_output_lands(mixtral, monkeypatch):
    """Offloaded weights (meta until the forward) or a model moved after the capture was made: the
    layer's sums follow the router's output, and nothing is allocated on the meta device."""
    batch = padded_batch()
    expected = run_sums(mixtral, **batch)
    report_devices(monkeypatch, mixtral, [CPU, torch.device("meta")])
    with capture_routing(mixtral) as cap, torch.no_grad():
        assert set(cap.sums_by_device) == {CPU}
        mixtral(**batch)
    assert set(cap.sums_by_device) == {CPU}
    assert_sums_close(cap.sums, expected)
