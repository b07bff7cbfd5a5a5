"""RL / preference losses against NumPy (float64) versions of the published formulas:
GRPO (Shao et al. 2024), DAPO (Yu et al. 2025), Dr.GRPO (Liu et al. 2025), DPO (Rafailov et
al. 2023) with the conservative label-smoothing form."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medvl_jax.tasks import rl_losses as rl

RTOL = 1e-5


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _inputs(b=8, t=12, seed=0):
    rng = np.random.default_rng(seed)
    old = rng.normal(-2.0, 1.0, (b, t))
    logp = old + rng.normal(0, 0.3, (b, t))      # Ratios spread across both clip bounds.
    ref = old + rng.normal(0, 0.2, (b, t))
    lengths = rng.integers(1, t + 1, b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float64)
    adv = rng.normal(size=b)
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    return {k: f32(v) for k, v in dict(logp=logp, old=old, ref=ref, mask=mask, adv=adv).items()}


# --- NumPy references, loop by loop as the papers write them. ---

def np_group_adv(r, g, scale, ddof, eps):
    r = np.asarray(r, np.float64)
    out = np.empty_like(r)
    for s in range(0, len(r), g):
        grp = r[s:s + g]
        a = grp - grp.mean()
        if scale == "std":
            a = a / (np.sqrt(((grp - grp.mean()) ** 2).sum() / (g - ddof)) + eps)
        out[s:s + g] = a
    return out


def np_token_objective(logp, old, ref, adv, eps_low, eps_high, beta):
    """Per-token loss -min(r A, clip(r) A) + beta * k3 (float64)."""
    logp, old, ref = (np.asarray(x, np.float64) for x in (logp, old, ref))
    out = np.zeros_like(logp)
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            r = np.exp(logp[i, t] - old[i, t])
            a = float(adv[i])
            surr = min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
            kl = np.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]) - 1
            out[i, t] = -surr + beta * kl
    return out


def np_grpo_seq_mean(per_tok, mask):
    """GRPO (Shao et al. 2024, eq. 3): 1/G sum_i 1/|o_i| sum_t."""
    return np.mean([(per_tok[i] * mask[i]).sum() / mask[i].sum() for i in range(len(mask))])


def np_dapo_token_mean(per_tok, mask):
    """DAPO (Yu et al. 2025, eq. 8): 1/sum_i |o_i| sum_i sum_t."""
    return (per_tok * mask).sum() / mask.sum()


def np_dr_grpo(per_tok, mask, max_len):
    """Dr.GRPO (Liu et al. 2025): the sum over tokens divided by a constant (B * max_len)."""
    return (per_tok * mask).sum() / (mask.shape[0] * max_len)


def np_dpo(pc, pr, rc, rr, beta, ls, w=None, alpha=0.0, lengths=None):
    """DPO (Rafailov et al. 2023; conservative with ``ls``), plus RPO's ``alpha`` times the
    chosen answer's NLL per token (Pang et al. 2024)."""
    pc, pr, rc, rr = (np.asarray(x, np.float64) for x in (pc, pr, rc, rr))
    z = beta * ((pc - rc) - (pr - rr))
    logsig = lambda x: -np.log1p(np.exp(-x))  # noqa: E731
    per = -(1 - ls) * logsig(z) - ls * logsig(-z)
    if alpha:
        per = per + alpha * (-pc / np.asarray(lengths, np.float64))
    if w is None:
        return per.mean()
    w = np.asarray(w, np.float64)
    return (w * per).sum() / w.sum()


# --- Tests. ---

@pytest.mark.parametrize("scale,ddof", [("std", 0), ("std", 1), ("none", 0)])
def test_group_advantages(scale, ddof):
    r = np.random.default_rng(1).normal(size=12).astype(np.float32)
    got = rl.group_advantages(jnp.asarray(r), 4, scale=scale, ddof=ddof, eps=1e-4)
    assert _rel(got, np_group_adv(r, 4, scale, ddof, 1e-4)) <= RTOL


def test_group_advantages_equal_rewards_are_zero_and_errors():
    a = rl.group_advantages(jnp.ones(6), 3)
    np.testing.assert_array_equal(np.asarray(a), 0.0)
    with pytest.raises(ValueError, match="group_size=4"):
        rl.group_advantages(jnp.ones(6), 4)
    with pytest.raises(ValueError, match="scale"):
        rl.group_advantages(jnp.ones(6), 3, scale="max")


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "dr_grpo"])
@pytest.mark.parametrize("eps_low,eps_high,beta", [(0.2, 0.2, 0.04), (0.2, 0.28, 0.0)])
def test_grpo_loss_matches_papers(aggregation, eps_low, eps_high, beta):
    x = _inputs()
    max_len = 16
    per_tok = np_token_objective(x["logp"], x["old"], x["ref"], x["adv"], eps_low, eps_high,
                                 beta)
    want = {"token_mean": np_dapo_token_mean(per_tok, x["mask"]),
            "sequence_mean": np_grpo_seq_mean(per_tok, x["mask"]),
            "dr_grpo": np_dr_grpo(per_tok, x["mask"], max_len)}[aggregation]
    ref = x["ref"] if beta > 0 else None
    got, metrics = rl.grpo_loss(x["logp"], x["old"], ref, x["adv"], x["mask"], eps_low=eps_low,
                                eps_high=eps_high, beta=beta, aggregation=aggregation,
                                max_len=max_len if aggregation == "dr_grpo" else None)
    assert _rel(got, want) <= RTOL
    # Metrics against NumPy too.
    m = x["mask"].astype(bool)
    r = np.exp(x["logp"].astype(np.float64) - x["old"])
    a = np.broadcast_to(x["adv"][:, None], r.shape)
    clip = ((r < 1 - eps_low) & (a < 0)) | ((r > 1 + eps_high) & (a > 0))
    assert 0 < clip[m].mean() < 1
    np.testing.assert_allclose(float(metrics["clip_fraction"]), clip[m].mean(), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["ratio_max"]), r[m].max(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["ratio_mean"]), r[m].mean(), rtol=1e-5)
    if beta > 0:
        d = x["ref"].astype(np.float64) - x["logp"]
        np.testing.assert_allclose(float(metrics["kl"]), (np.exp(d) - d - 1)[m].mean(),
                                   rtol=1e-5)


def test_grpo_loss_gradient_finite_and_on_policy_value():
    x = _inputs(seed=3)
    fn = lambda lp: rl.grpo_loss(lp, x["old"], x["ref"], x["adv"], x["mask"], beta=0.1)[0]  # noqa
    g = jax.grad(fn)(jnp.asarray(x["logp"]))
    assert np.isfinite(np.asarray(g)).all()
    assert np.all(np.asarray(g)[x["mask"] == 0] == 0)
    # On-policy (logp == old == ref): the loss is -mean(A) over tokens, its gradient -A / N.
    lp = jnp.asarray(x["old"])
    loss, met = rl.grpo_loss(lp, lp, lp, x["adv"], x["mask"], beta=0.1)
    want = -(x["adv"][:, None] * x["mask"]).sum() / x["mask"].sum()
    assert abs(float(loss) - want) <= 1e-5 * max(1.0, abs(want))
    assert float(met["kl"]) == 0.0 and float(met["clip_fraction"]) == 0.0
    g = jax.grad(lambda p: rl.grpo_loss(p, lp, lp, x["adv"], x["mask"], beta=0.1)[0])(lp)
    np.testing.assert_allclose(np.asarray(g), -x["adv"][:, None] * x["mask"] / x["mask"].sum(),
                               rtol=1e-5, atol=1e-8)


def test_grpo_loss_errors():
    x = _inputs()
    with pytest.raises(ValueError, match="needs ref_logp"):
        rl.grpo_loss(x["logp"], x["old"], None, x["adv"], x["mask"], beta=0.1)
    with pytest.raises(ValueError, match="aggregation"):
        rl.grpo_loss(x["logp"], x["old"], None, x["adv"], x["mask"], aggregation="mean")
    with pytest.raises(ValueError, match="old_logp"):
        rl.grpo_loss(x["logp"], x["old"][:, :3], None, x["adv"], x["mask"])


@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_dpo_loss_matches_paper(ls, weighted):
    rng = np.random.default_rng(5)
    b = 16
    pc, pr = rng.normal(-20, 3, b), rng.normal(-22, 3, b)
    rc, rr = pc + rng.normal(0, 1, b), pr + rng.normal(0, 1, b)
    w = rng.uniform(0.2, 2.0, b) if weighted else None
    f32 = lambda v: None if v is None else jnp.asarray(v, jnp.float32)  # noqa: E731
    got, met = rl.dpo_loss(f32(pc), f32(pr), f32(rc), f32(rr), beta=0.1, label_smoothing=ls,
                           weights=f32(w))
    args32 = [np.asarray(v, np.float32) for v in (pc, pr, rc, rr)]
    assert _rel(got, np_dpo(*args32, 0.1, ls, None if w is None else np.float32(w))) <= RTOL
    chosen = 0.1 * (args32[0].astype(np.float64) - args32[2])
    rejected = 0.1 * (args32[1].astype(np.float64) - args32[3])
    np.testing.assert_allclose(float(met["reward_margin"]), (chosen - rejected).mean(),
                               rtol=1e-4)
    assert float(met["reward_accuracy"]) == (chosen > rejected).mean()
    g = jax.grad(lambda p: rl.dpo_loss(p, f32(pr), f32(rc), f32(rr), beta=0.1,
                                       label_smoothing=ls, weights=f32(w))[0])(f32(pc))
    assert np.isfinite(np.asarray(g)).all() and np.all(np.asarray(g) <= 0)


@pytest.mark.parametrize("weighted", [False, True])
def test_rpo_term_matches_paper(weighted):
    rng = np.random.default_rng(6)
    b = 12
    pc, pr = rng.normal(-20, 3, b), rng.normal(-22, 3, b)
    rc, rr = pc + rng.normal(0, 1, b), pr + rng.normal(0, 1, b)
    n = rng.integers(1, 9, b)
    w = rng.uniform(0.2, 2.0, b) if weighted else None
    f32 = lambda v: None if v is None else jnp.asarray(v, jnp.float32)  # noqa: E731
    got, met = rl.dpo_loss(f32(pc), f32(pr), f32(rc), f32(rr), beta=0.2, weights=f32(w),
                           nll_weight=0.5, chosen_lengths=jnp.asarray(n))
    args32 = [np.asarray(v, np.float32) for v in (pc, pr, rc, rr)]
    want = np_dpo(*args32, 0.2, 0.0, w, alpha=0.5, lengths=n)
    assert _rel(got, want) <= RTOL
    assert abs(want - np_dpo(*args32, 0.2, 0.0, w)) > 0.1  # The term is not negligible here.
    np.testing.assert_allclose(float(met["chosen_nll"]), (-args32[0] / n).mean(), rtol=1e-5)
    # The NLL term pulls the chosen log-probs up harder than DPO alone.
    grad = lambda a: np.asarray(jax.grad(lambda p: rl.dpo_loss(  # noqa: E731
        p, f32(pr), f32(rc), f32(rr), beta=0.2, nll_weight=a,
        chosen_lengths=jnp.asarray(n))[0])(f32(pc)))
    np.testing.assert_allclose(grad(0.5) - grad(0.0), -0.5 / n / b, rtol=1e-5)
    with pytest.raises(ValueError, match="chosen_lengths"):
        rl.dpo_loss(f32(pc), f32(pr), f32(rc), f32(rr), nll_weight=0.5)


def test_dpo_loss_at_reference_is_log2_and_errors():
    z = jnp.zeros(4)
    loss, met = rl.dpo_loss(z - 3, z - 5, z - 3, z - 5, beta=0.5)
    assert abs(float(loss) - np.log(2)) < 1e-6 and float(met["reward_accuracy"]) == 0.0
    with pytest.raises(ValueError, match="label_smoothing"):
        rl.dpo_loss(z, z, z, z, label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"\[B\]"):
        rl.dpo_loss(z, z, z, jnp.zeros(3))
