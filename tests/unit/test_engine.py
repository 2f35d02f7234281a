"""End to end on tiny random models, in process: split equals unsplit, speculative equals target-only."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from specmesh.actors import hf, tiny
from specmesh.runtime import SpecConfig, SpecMesh

torch.set_num_threads(1)
TARGET = "tiny"
DRAFT = "tiny-draft"  # the target's weights + noise: agrees with it about half the time
PROMPT = [5, 17, 42, 99, 3, 250, 7, 7, 128, 64]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("models"))


def _config(cache, **kw) -> SpecConfig:
    base = dict(target=TARGET, draft=DRAFT, dtype="float32", cache_dir=cache, max_new_tokens=40)
    return SpecConfig(**{**base, **kw})


@pytest.mark.parametrize("num_stages", [1, 2, 3, 4])
def test_split_target_logits_equal_unsplit(cache, num_stages):
    path = tiny.materialise(TARGET, cache)
    ids = torch.tensor(PROMPT)
    pos = torch.arange(len(PROMPT))
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        want = reference(ids.view(1, -1)).logits[0]
    total = hf.num_layers(hf.load_config(path))
    bounds = torch.linspace(0, total, num_stages + 1).round().long().tolist()
    hidden = None
    for a, b in zip(bounds[:-1], bounds[1:]):
        stage = hf.load_stage(path, range(a, b), dtype=torch.float32)
        kw = {"input_ids": ids} if stage.is_first else {"hidden": hidden}
        hidden = hf.forward(stage, stage.new_cache(), position_ids=pos, **kw)
    assert torch.equal(hf.lm_head(stage, hidden), want)


@pytest.fixture(scope="module")
def engines(cache):
    built = {n: SpecMesh(_config(cache, num_stages=n)) for n in (1, 2, 3)}
    yield built
    for e in built.values():
        e.close()


def test_target_only_equals_transformers_greedy(cache, engines):
    path = tiny.materialise(TARGET, cache)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = model.generate(
        torch.tensor([PROMPT]), max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(PROMPT) :].tolist()
    got = engines[2].generate(PROMPT, draft=None)
    assert got.output_ids == out
    assert got.stats.mean_accepted_length == 1.0 and got.stats.drafted == 0


@pytest.mark.parametrize("num_stages", [1, 2, 3])
def test_greedy_speculative_equals_target_only(engines, num_stages):
    engine = engines[num_stages]
    reference = engine.generate(PROMPT, draft=None).output_ids
    for gamma in range(1, 7):
        result = engine.generate(PROMPT, gamma=gamma)
        assert result.output_ids == reference, f"gamma {gamma}"
        s = result.stats
        assert 0 < s.accepted < s.drafted, "the noisy draft must be partly right and partly wrong"
        assert s.rounds < len(reference)


def test_sampling_with_a_seed_repeats_exactly(engines):
    engine = engines[2]
    a = engine.generate(PROMPT, temperature=1.0, seed=11)
    b = engine.generate(PROMPT, temperature=1.0, seed=11)
    c = engine.generate(PROMPT, temperature=1.0, seed=12)
    assert a.output_ids == b.output_ids
    assert a.output_ids != c.output_ids
    assert a.stats.accepted > 0


def test_streaming_yields_the_same_tokens(engines):
    engine = engines[2]
    chunks = list(engine.stream(PROMPT, gamma=3))
    assert [t for c in chunks for t in c.token_ids] == engine.generate(PROMPT, gamma=3).output_ids
    assert all(1 <= len(c.token_ids) <= 4 for c in chunks)


def test_stats_and_bytes(engines):
    result = engines[2].generate(PROMPT, gamma=4, sparse_k=8)
    s = result.stats
    assert s.generated_tokens == 40 and result.finish_reason == "length"
    assert s.mean_accepted_length == pytest.approx(40 / s.rounds, abs=1 / s.rounds)
    assert s.bytes_up > 0 and s.bytes_down > 0 and s.bytes_between_stages > 0
    assert len(s.per_position_acceptance) == 4
    assert s.position_tried[0] == sum(1 for r in s.records if r.gamma > 0)  # every drafted round tests 0
    busy = s.busy_fraction()
    assert set(busy) == {"stage0", "stage1", "draft"} and all(0 < v < 1 for v in busy.values())
    assert sum(busy.values()) <= 1.0 + 1e-6  # in process the workers take turns


def test_eos_stops_generation(engines):
    engine = engines[1]
    ref = engine.generate(PROMPT, draft=None).output_ids
    eos = ref[5]
    engine.backend.info = type(engine.backend.info)(**{**engine.backend.info.__dict__, "eos_token_ids": (eos,)})
    try:
        out = engine.generate(PROMPT, gamma=4)
    finally:
        engine.backend.info = type(engine.backend.info)(**{**engine.backend.info.__dict__, "eos_token_ids": ()})
    assert out.finish_reason == "eos" and out.output_ids == ref[: ref.index(eos) + 1]


# ---------- bad input: clear errors naming the value ----------

def test_config_errors_name_the_value():
    for kw, msg in [
        (dict(gamma=0), "gamma must be >= 1, got 0"),
        (dict(temperature=-0.5), "temperature must be >= 0, got -0.5"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(acceptance="magic"), "unknown acceptance policy 'magic'"),
        (dict(sparsifier="zip"), "unknown sparsifier 'zip'"),
        (dict(backend="gpu"), "backend must be one of"),
    ]:
        with pytest.raises(ValueError, match=msg):
            SpecConfig(target=TARGET, **kw)


def test_more_stages_than_layers(cache):
    with pytest.raises(ValueError, match="5 stages but the target has 4 layers"):
        SpecMesh(_config(cache, num_stages=5))


def test_vocabularies_differ(cache):
    with pytest.raises(ValueError, match="vocabulary of 128 tokens but target 'tiny' has 256"):
        SpecMesh(_config(cache, draft="tiny-draft:vocab=128"))


def test_prompt_errors(engines):
    engine = engines[1]
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.generate([])
    with pytest.raises(ValueError, match="the prompt has 600 tokens; the context holds 512"):
        engine.generate([1] * 600)
    with pytest.raises(ValueError, match=r"prompt token ids \[256\] outside the vocabulary"):
        engine.generate([1, 256])
    with pytest.raises(TypeError, match="no tokenizer"):
        engine.generate("hello")


# ---------- token trees (DSD multi-candidate rounds) ----------

def test_tree_mask_forward_equals_causal_forward(cache):
    """A chain fed with the explicit tree mask and positions gives the causal forward's logits."""
    from specmesh.runtime.tree import tree_attention_mask, tree_position_ids

    stage = hf.load_stage(tiny.materialise(TARGET, cache), dtype=torch.float32)
    prefix, context, cands = PROMPT[:6], PROMPT[6:8], torch.tensor(PROMPT[8:])
    want_cache, got_cache = stage.new_cache(), stage.new_cache()
    for c in (want_cache, got_cache):
        hf.forward(stage, c, input_ids=torch.tensor(prefix), position_ids=torch.arange(6))
    ids = torch.cat([torch.tensor(context), cands])
    want = hf.forward(stage, want_cache, input_ids=ids, position_ids=torch.arange(6, 10))
    parents = [-1, 0]
    kw = dict(num_cached=6, num_context=2)
    got = hf.forward(stage, got_cache, input_ids=ids, position_ids=tree_position_ids(parents, **kw)[0],
                     attention_mask=tree_attention_mask(parents, **kw))
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("num_stages", [1, 2, 3])
def test_greedy_tree_equals_target_only(engines, num_stages):
    engine = engines[num_stages]
    reference = engine.generate(PROMPT, draft=None).output_ids
    for gamma, width in [(1, 2), (3, 2), (4, 3), (6, 4)]:
        result = engine.generate(PROMPT, gamma=gamma, tree_width=width)
        assert result.output_ids == reference, f"gamma {gamma} width {width}"
    chain = engine.generate(PROMPT, gamma=4).stats
    tree = engine.generate(PROMPT, gamma=4, tree_width=4).stats
    assert tree.mean_accepted_length > chain.mean_accepted_length  # siblings rescue rejected depths


def test_sampled_tree_repeats_and_accepts(engines):
    engine = engines[2]
    a = engine.generate(PROMPT, temperature=1.0, seed=3, tree_width=3)
    b = engine.generate(PROMPT, temperature=1.0, seed=3, tree_width=3)
    assert a.output_ids == b.output_ids and a.stats.accepted > 0


def test_sampled_tree_first_token_is_distributed_as_target(engines, cache):
    """End to end through workers, codec and scheduler: the first token of an exact tree round
    (depth 1, 3 siblings from top-8 q) follows the target's p (chi-square, 99.9%)."""
    import math

    engine = engines[2]
    stage = hf.load_stage(tiny.materialise(TARGET, cache), dtype=torch.float32)
    logits = hf.lm_head(stage, hf.forward(stage, stage.new_cache(), input_ids=torch.tensor(PROMPT),
                                          position_ids=torch.arange(len(PROMPT)))[-1:])
    p = torch.softmax(logits[0], -1)
    n = 1200
    counts = torch.zeros_like(p)
    for seed in range(n):
        out = engine.generate(PROMPT, temperature=1.0, seed=seed, max_new_tokens=2, tree_width=3, sparse_k=8)
        counts[out.output_ids[0]] += 1
    expected = p * n
    keep = expected >= 5
    chi2 = float((((counts[keep] - expected[keep]) ** 2) / expected[keep]).sum())
    rest_o, rest_e = float(counts[~keep].sum()), float(expected[~keep].sum())
    chi2 += (rest_o - rest_e) ** 2 / rest_e
    df = int(keep.sum())
    critical = df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3
    assert chi2 < critical, f"chi2 {chi2:.1f}, df {df}, critical {critical:.1f}"


# ---------- overlap: drafting the next round during verification ----------

@pytest.mark.parametrize("kw", [dict(), dict(tree_width=3), dict(temperature=1.0, seed=5),
                                dict(temperature=0.8, seed=2, tree_width=2, gamma=3)])
def test_overlap_never_changes_the_output(engines, kw):
    engine = engines[2]
    off = engine.generate(PROMPT, overlap=False, **kw)
    on = engine.generate(PROMPT, overlap=True, **kw)
    assert on.output_ids == off.output_ids
    assert [r.accepted for r in on.stats.records] == [r.accepted for r in off.stats.records]
    c = on.stats.draft_counters
    assert c["speculated"] > 0 and c["forwards"] > off.stats.draft_counters["forwards"]
    assert off.stats.draft_work_used == 1.0 and 0 < on.stats.draft_work_used < 1.0


def test_overlap_reuses_speculation_when_the_draft_is_right(cache):
    """With the target as its own draft every round is fully accepted and the bonus guessed right:
    every depth after the first round comes from speculation (the draft in full precision: an int8
    copy of the target is another model)."""
    with SpecMesh(_config(cache, draft=TARGET, num_stages=2)) as engine:
        out = engine.generate(PROMPT, overlap=True, gamma=4)
        ref = engine.generate(PROMPT, draft=None)
    assert out.output_ids == ref.output_ids
    c = out.stats.draft_counters
    assert out.stats.acceptance_rate == 1.0
    assert c["reused"] >= 4 * (out.stats.rounds - 2)


def test_concurrent_sessions_equal_sequential(engines):
    engine = engines[2]
    prompts = [PROMPT, PROMPT[3:], [9, 8, 7, 6, 5], PROMPT[::-1]]
    want = [engine.generate(p, gamma=3).output_ids for p in prompts]
    got = engine.generate_many(prompts, gamma=3)
    assert [r.output_ids for r in got] == want
    # Each session counts its own bytes, not its neighbours'.
    alone = [engine.generate(p, gamma=3).stats for p in prompts]
    assert [r.stats.bytes_up for r in got] == [s.bytes_up for s in alone]
    assert [r.stats.bytes_down for r in got] == [s.bytes_down for s in alone]


def test_bf16_tree_round_runs(cache):
    """The tree mask takes the model's dtype (an fp32 mask on a bf16 model is refused by sdpa)."""
    with SpecMesh(_config(cache, dtype="bfloat16", max_new_tokens=12)) as engine:
        out = engine.generate(PROMPT, tree_width=3)
    assert len(out.output_ids) == 12 and out.stats.rounds < 12


def test_build_time_fields_cannot_change_per_call(engines):
    engine = engines[1]
    with pytest.raises(ValueError, match=r"\['num_stages'\] are fixed when the engine is built"):
        engine.generate(PROMPT, num_stages=2)
    with pytest.raises(ValueError, match=r"\['draft'\] are fixed"):
        engine.generate(PROMPT, draft="tiny-draft:noise=0.5")
    assert engine.generate(PROMPT, draft=None, max_new_tokens=3).stats.drafted == 0
    with pytest.raises(ValueError, match=r"\['timeout_s'\] are fixed"):  # the deadline is built in
        engine.generate(PROMPT, timeout_s=5.0)


def test_a_failed_round_keeps_every_committed_token(engines, monkeypatch):
    """The error of a failed round carries what was committed before it; a streaming caller has
    received exactly those tokens."""
    from specmesh.runtime import GenerationError

    engine = engines[2]
    target = engine.backend.target
    real, calls = target.verify, []

    def fails_third(proposal):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the edge went away")
        return real(proposal)

    monkeypatch.setattr(target, "verify", fails_third)
    streamed = []
    with pytest.raises(GenerationError, match="the edge went away") as err:
        for chunk in engine.stream(PROMPT):
            streamed.extend(chunk.token_ids)
    assert err.value.output_ids == streamed and len(streamed) >= 2
    monkeypatch.undo()
    assert engine.generate(PROMPT).output_ids[: len(streamed)] == streamed
    assert all(not s.sessions for s in target.stages)  # the failed session was freed
