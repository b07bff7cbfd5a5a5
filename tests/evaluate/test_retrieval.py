"""Contrastive evaluators: ROC AUC, Recall@K, zero-shot classification, linear probe."""
import numpy as np
import pytest

from medvl_jax.evaluate import retrieval


def _brute_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _trapezoid_auc(scores, labels):
    """Area under the ROC curve traced threshold by threshold (tied scores in one step)."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    tpr, fpr = [0.0], [0.0]
    for t in np.unique(scores)[::-1]:
        pred = scores >= t
        tpr.append((pred & labels).sum() / labels.sum())
        fpr.append((pred & ~labels).sum() / (~labels).sum())
    return sum((fpr[i + 1] - fpr[i]) * (tpr[i + 1] + tpr[i]) / 2 for i in range(len(tpr) - 1))


def test_roc_auc_hand_computed():
    # Pairs (pos, neg): (0.8 vs 0.1, 0.4, 0.4) -> 3 wins; (0.4 vs 0.1) win, (0.4 vs 0.4) x2 ties.
    # (0.35 vs 0.1) win, vs 0.4 losses. Total = 3 + 1 + 1 + 1 = 6 of 9.
    scores = [0.8, 0.4, 0.35, 0.1, 0.4, 0.4]
    labels = [1, 1, 1, 0, 0, 0]
    assert retrieval.roc_auc(scores, labels) == pytest.approx(6 / 9)
    assert retrieval.roc_auc([0.1, 0.9], [0, 1]) == 1.0
    assert retrieval.roc_auc([0.9, 0.1], [0, 1]) == 0.0
    assert retrieval.roc_auc([0.5] * 4, [0, 1, 0, 1]) == 0.5


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_matches_pairwise_count_and_trapezoid(seed):
    rng = np.random.default_rng(seed)
    n = 60
    scores = np.round(rng.normal(size=n), 1)  # Rounding makes many ties.
    labels = rng.random(n) < 0.4
    auc = retrieval.roc_auc(scores, labels)
    assert auc == pytest.approx(_brute_auc(scores, labels), abs=1e-12)
    assert auc == pytest.approx(_trapezoid_auc(scores, labels), abs=1e-12)


def test_roc_auc_errors():
    with pytest.raises(ValueError, match="needs both classes"):
        retrieval.roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="labels must be 0/1"):
        retrieval.roc_auc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        retrieval.roc_auc([0.1, 0.2, 0.3], [0, 1])


def test_recall_at_k_hand_built():
    sim = np.array([
        [0.9, 0.1, 0.2, 0.0],   # image 0: its text ranks 1st.
        [0.8, 0.5, 0.1, 0.0],   # image 1: 2nd.
        [0.7, 0.6, 0.3, 0.0],   # image 2: 3rd.
        [0.9, 0.8, 0.7, 0.1],   # image 3: 4th.
    ])
    r = retrieval.recall_at_k(sim, ks=(1, 2, 3, 4))
    assert [r[f"i2t@{k}"] for k in (1, 2, 3, 4)] == [0.25, 0.5, 0.75, 1.0]
    # Columns: text 0 -> image 0 ranks 1st of (0.9, 0.8, 0.7, 0.9)? tie with image 3 counts
    # against: 2nd. Text 1 -> image 1 (0.5) vs 0.1, 0.6, 0.8: 3rd. Text 2 -> image 2 (0.3)
    # vs 0.2, 0.1, 0.7: 2nd. Text 3 -> image 3 (0.1) vs 0, 0, 0: 1st.
    assert [r[f"t2i@{k}"] for k in (1, 2, 3, 4)] == [0.25, 0.75, 1.0, 1.0]


def test_recall_identity_and_constant():
    r = retrieval.recall_at_k(np.eye(12), ks=(1, 5, 10))
    assert all(v == 1.0 for v in r.values())
    r = retrieval.recall_at_k(np.ones((12, 12)), ks=(1, 5, 10))  # Ties count against.
    assert all(v == 0.0 for v in r.values())


def test_recall_multi_positive():
    # Image 0 has texts 0 and 1; image 1 has text 2; text 3 belongs to image 1 as well.
    sim = np.array([
        [0.2, 0.9, 0.95, 0.1],
        [0.3, 0.4, 0.2, 0.5],
    ])
    pos = np.array([[True, True, False, False],
                    [False, False, True, True]])
    r = retrieval.recall_at_k_multi(sim, pos, ks=(1, 2))
    # i2t: image 0 best positive text 1 (0.9) is 2nd behind text 2; image 1 best positive
    # text 3 (0.5) is 1st.
    assert (r["i2t@1"], r["i2t@2"]) == (0.5, 1.0)
    # t2i: text0 -> image0 0.2 vs 0.3: 2nd; text1 -> 0.9 vs 0.4: 1st; text2 -> image1 0.2
    # vs 0.95: 2nd; text3 -> 0.5 vs 0.1: 1st.
    assert (r["t2i@1"], r["t2i@2"]) == (0.5, 1.0)
    with pytest.raises(ValueError, match="have no positive"):
        retrieval.recall_at_k_multi(sim, np.zeros_like(pos), ks=(1,))
    with pytest.raises(ValueError, match="must be square"):
        retrieval.recall_at_k(sim)


def test_zero_shot_prompt_ensemble():
    d = 4
    e = np.eye(d)
    # Class 0 prompts point near axis 0, class 1 near axis 1 (different lengths and counts:
    # normalising before averaging must make lengths irrelevant).
    prompts = [np.array([10 * e[0] + e[2], 0.1 * e[0] - 0.01 * e[2]]),
               np.array([e[1], 2 * e[1] + 0.2 * e[3], 0.5 * e[1]])]
    cls = retrieval.class_embeddings(prompts)
    np.testing.assert_allclose(np.linalg.norm(cls, axis=1), 1.0)
    want0 = (e[0] + 0.1 * e[2]) / np.linalg.norm(e[0] + 0.1 * e[2])
    want0 = want0 + (e[0] - 0.1 * e[2]) / np.linalg.norm(e[0] - 0.1 * e[2])
    np.testing.assert_allclose(cls[0], want0 / np.linalg.norm(want0))
    imgs = np.array([e[0] + 0.1 * e[1], 3 * e[1], e[0] + e[1] * 1.2])
    scores, preds = retrieval.zero_shot_classify(imgs, prompts)
    assert scores.shape == (3, 2)
    assert preds.tolist() == [0, 1, 1]
    assert retrieval.accuracy(preds, [0, 1, 0]) == pytest.approx(2 / 3)
    # [C, P, D] arrays give the same classes as equal-length lists.
    arr = np.stack([np.stack([e[0], e[2]]), np.stack([e[1], e[3]])])
    np.testing.assert_allclose(retrieval.class_embeddings(arr),
                               retrieval.class_embeddings(list(arr)))
    with pytest.raises(ValueError, match="do not match"):
        retrieval.zero_shot_classify(np.ones((2, 3)), prompts)


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_linear_probe_separable(optimizer):
    rng = np.random.default_rng(0)
    c, d, n = 3, 16, 300
    centres = rng.normal(size=(c, d)) * 3
    y = rng.integers(0, c, size=2 * n)
    x = centres[y] + rng.normal(size=(2 * n, d))
    out = retrieval.linear_probe(x[:n], y[:n], x[n:], y[n:], optimizer=optimizer, steps=200)
    assert out["accuracy"] >= 0.95
    assert len(out["per_class_auc"]) == c and min(out["per_class_auc"]) > 0.95


def test_linear_probe_binary_auc_and_random_labels():
    rng = np.random.default_rng(1)
    n, d = 400, 8
    x = rng.normal(size=(2 * n, d))
    y = (x @ rng.normal(size=d) > 0).astype(int)
    out = retrieval.linear_probe(x[:n], y[:n], x[n:], y[n:])
    assert out["accuracy"] >= 0.95 and out["auc"] >= 0.99
    # Labels independent of the features: the probe cannot beat chance on held-out data.
    y_rand = rng.integers(0, 2, size=2 * n)
    out = retrieval.linear_probe(x[:n], y_rand[:n], x[n:], y_rand[n:])
    assert abs(out["accuracy"] - 0.5) < 0.08
    assert abs(out["auc"] - 0.5) < 0.1


def test_linear_probe_errors():
    x = np.zeros((4, 2))
    with pytest.raises(ValueError, match="integer class ids"):
        retrieval.linear_probe(x, np.array([0.0, 1, 0, 1]), x, np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="do not match features"):
        retrieval.linear_probe(x, np.array([0, 1]), x, np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="optimizer must be"):
        retrieval.linear_probe(x, np.array([0, 1, 0, 1]), x, np.array([0, 1, 0, 1]),
                               optimizer="sgd")
