import numpy as np
import torch

from capvqa.ops.seeded_sampling import choose_tokens, row_seed, step_uniforms


def test_uniforms_are_deterministic_and_spread():
    seeds = np.array([row_seed(42, "item", d) for d in range(5000)], dtype=np.uint64)
    u0 = step_uniforms(seeds, 0)
    assert ((u0 >= 0) & (u0 < 1)).all()
    assert (u0 == step_uniforms(seeds, 0)).all()
    assert not np.allclose(u0, step_uniforms(seeds, 1))
    assert abs(u0.mean() - 0.5) < 0.02 and abs(u0.std() - 0.2887) < 0.02


def test_top_k_one_is_greedy():
    scores = torch.randn(8, 30)
    chosen = choose_tokens(scores, torch.rand(8, dtype=torch.float64), top_k=1, top_p=1.0)
    assert (chosen == scores.argmax(-1)).all()


def test_sampling_follows_the_top_k_distribution():
    scores = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0]).repeat(20000, 1)
    seeds = np.array([row_seed(0, "dist", d) for d in range(20000)], dtype=np.uint64)
    chosen = choose_tokens(scores, torch.from_numpy(step_uniforms(seeds, 3)), top_k=3, top_p=1.0)
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.5]), 0)
    observed = torch.bincount(chosen, minlength=5).float() / 20000
    assert observed[3:].sum() == 0  # outside the top k
    torch.testing.assert_close(observed[:3], expected, atol=0.015, rtol=0)


def test_top_p_cuts_the_tail():
    scores = torch.log(torch.tensor([0.6, 0.3, 0.1])).repeat(3000, 1)
    u = torch.linspace(0, 0.999, 3000, dtype=torch.float64)
    chosen = choose_tokens(scores, u, top_k=0, top_p=0.8)
    assert set(chosen.tolist()) == {0, 1}


def test_masked_tokens_are_never_chosen():
    scores = torch.randn(500, 10)
    scores[:, 4] = float("-inf")  # e.g. EOS banned by min_length
    chosen = choose_tokens(scores, torch.rand(500, dtype=torch.float64), top_k=50, top_p=1.0)
    assert (chosen != 4).all()


def test_processor_bans_eos_until_min_new_tokens():
    from capvqa.ops.seeded_sampling import SeededSamplingProcessor

    seeds = np.array([row_seed(0, "eos", d) for d in range(64)], dtype=np.uint64)
    processor = SeededSamplingProcessor(seeds, prompt_length=4, top_k=5, top_p=1.0, eos_token_id=3, min_new_tokens=2)
    scores = torch.zeros(64, 10)
    scores[:, 3] = 10.0  # EOS is by far the most likely token
    # the processor overwrites generate's per-step logits copy in place, so each call gets its own copy
    early = processor(torch.zeros(64, 5, dtype=torch.long), scores.clone()).argmax(-1)  # step 1 < 2
    late = processor(torch.zeros(64, 6, dtype=torch.long), scores.clone()).argmax(-1)  # step 2
    assert (early != 3).all() and (late == 3).all()


def test_processor_output_keeps_only_the_chosen_token():
    from capvqa.ops.seeded_sampling import SeededSamplingProcessor, choose_tokens, step_uniforms

    seeds = np.array([row_seed(1, "one", d) for d in range(8)], dtype=np.uint64)
    scores = torch.randn(8, 30)
    expected = choose_tokens(scores, torch.from_numpy(step_uniforms(seeds, 0)), top_k=5, top_p=1.0)
    out = SeededSamplingProcessor(seeds, prompt_length=2, top_k=5, top_p=1.0)(
        torch.zeros(8, 2, dtype=torch.long), scores.clone())
    assert torch.equal(out.argmax(-1), expected)
    assert (torch.isfinite(out).sum(-1) == 1).all()


def test_a_relative_logit_difference_changes_tokens_at_the_documented_rate():
    """Logits moved by delta (relative), as another batch layout can move them, change about 10 * delta
    of the tokens drawn from a peaked, BLIP-like distribution: the rate the module docstring states."""
    generator = torch.Generator().manual_seed(0)
    rows, vocab, delta = 20000, 1000, 3e-4
    logits = torch.cat([torch.randn(vocab - 5, generator=generator) * 4 - 5,
                        torch.randn(5, generator=generator) * 1.5 + 20])
    scores = logits.repeat(rows, 1)
    seeds = np.array([row_seed(0, "noise", d) for d in range(rows)], dtype=np.uint64)
    uniforms = torch.from_numpy(step_uniforms(seeds, 0))
    base = choose_tokens(scores, uniforms, top_k=50, top_p=1.0)
    noisy = scores * (1 + delta * torch.randn(scores.shape, generator=generator))
    changed = (choose_tokens(noisy, uniforms, top_k=50, top_p=1.0) != base).float().mean().item()
    assert 3 < changed / delta < 30
