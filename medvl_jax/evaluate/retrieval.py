"""Evaluators for contrastive image–text models: ROC AUC, retrieval Recall@K, zero-shot
classification with prompt ensembles, accuracy and a linear probe on frozen features.

Pure NumPy (the probe trains with optax); inputs may be NumPy or JAX arrays.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, ties given the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Start index of each run of equal values, and the run each sorted element belongs to.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    mean_rank = (starts + ends + 1) / 2.0  # Mean of ranks starts+1 .. ends.
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (1 = positive).

    Mann–Whitney form: the probability that a random positive scores above a random negative,
    ties counting one half, which equals the trapezoidal area under the ROC curve. Raises if
    the labels are not 0/1 or only one class is present.
    """
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"roc_auc: {scores.shape[0]} scores but {labels.shape[0]} labels")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"roc_auc: labels must be 0/1 (or bool), got values "
                         f"{np.unique(labels)[:10].tolist()}")
    if not np.isfinite(scores).all():
        raise ValueError("roc_auc: scores contain NaN or inf")
    pos = labels.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_auc: needs both classes, got {n_pos} positives and "
                         f"{n_neg} negatives")
    rank_sum = _rankdata(scores)[pos].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _check_ks(ks) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    return ks


def _hits(sim: np.ndarray, positives: np.ndarray, ks, what: str) -> dict[int, float]:
    """Fraction of rows whose best-scoring positive ranks within the top k (per k).

    Rank of the best positive = the number of negatives scoring at least as high (ties are
    counted against the model, so a constant similarity does not score perfectly).
    """
    has = positives.any(axis=1)
    if not has.all():
        raise ValueError(f"recall: {int((~has).sum())} {what} rows have no positive "
                         f"(first: row {int(np.flatnonzero(~has)[0])})")
    best = np.where(positives, sim, -np.inf).max(axis=1)
    rank = np.sum(~positives & (sim >= best[:, None]), axis=1)
    return {k: float(np.mean(rank < k)) for k in ks}


def recall_at_k_multi(sim, positives, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K with several positives: ``sim [N_img, N_txt]``, ``positives`` a boolean
    matrix of the same shape (True = the text describes the image).

    Image->text: a hit if any positive text is in the image's top k texts; text->image the
    same for each text. Every image and text needs at least one positive. Returns
    ``{"i2t@k": ..., "t2i@k": ...}``.
    """
    ks = _check_ks(ks)
    sim = np.asarray(sim, np.float64)
    positives = np.asarray(positives)
    if sim.ndim != 2 or positives.shape != sim.shape:
        raise ValueError(f"recall: sim {sim.shape} and positives {positives.shape} must be "
                         "matrices of the same shape [N_img, N_txt]")
    if positives.dtype != bool:
        raise ValueError(f"recall: positives must be a boolean matrix, got {positives.dtype}")
    out = {f"i2t@{k}": v for k, v in _hits(sim, positives, ks, "image").items()}
    out.update({f"t2i@{k}": v for k, v in _hits(sim.T, positives.T, ks, "text").items()})
    return out


def recall_at_k(sim, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K for one positive per row: ``sim [N, N]`` with image i matching text i.

    Returns ``{"i2t@k": ..., "t2i@k": ...}`` (fractions in [0, 1]); ties count against the
    model.
    """
    sim = np.asarray(sim)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"recall_at_k: sim must be square [N, N] (image i matches text i), "
                         f"got {sim.shape}; use recall_at_k_multi for other layouts")
    return recall_at_k_multi(sim, np.eye(sim.shape[0], dtype=bool), ks)


def _normalise(x: np.ndarray, what: str) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    if (norm == 0).any():
        raise ValueError(f"{what}: an embedding has zero norm")
    return x / norm


def class_embeddings(class_text_embs) -> np.ndarray:
    """One embedding per class from its prompt embeddings: each prompt normalised, averaged,
    renormalised. ``class_text_embs``: ``[C, D]``, ``[C, P, D]``, or a list of ``[P_c, D]``
    arrays (a different number of prompts per class)."""
    if isinstance(class_text_embs, (list, tuple)):
        groups = [np.asarray(g, np.float64) for g in class_text_embs]
    else:
        arr = np.asarray(class_text_embs, np.float64)
        if arr.ndim == 2:
            arr = arr[:, None, :]
        if arr.ndim != 3:
            raise ValueError(f"class_text_embs must be [C, D], [C, P, D] or a list of [P, D], "
                             f"got shape {arr.shape}")
        groups = list(arr)
    out = []
    for c, g in enumerate(groups):
        if g.ndim == 1:
            g = g[None]
        if g.ndim != 2 or len(g) == 0:
            raise ValueError(f"class {c}: prompt embeddings must be a non-empty [P, D], "
                             f"got shape {g.shape}")
        out.append(_normalise(_normalise(g, f"class {c} prompts").mean(axis=0), f"class {c}"))
    dims = {e.shape[-1] for e in out}
    if len(dims) != 1:
        raise ValueError(f"class embeddings have different widths {sorted(dims)}")
    return np.stack(out)


def zero_shot_classify(img_emb, class_text_embs) -> tuple[np.ndarray, np.ndarray]:
    """Zero-shot classification: cosine similarity of each image to each class embedding
    (see ``class_embeddings`` for prompt ensembles). Returns ``(scores [N, C], predictions
    [N])``."""
    img = np.asarray(img_emb, np.float64)
    cls = class_embeddings(class_text_embs)
    if img.ndim != 2 or img.shape[1] != cls.shape[1]:
        raise ValueError(f"zero_shot_classify: image embeddings {img.shape} do not match "
                         f"class embeddings of width {cls.shape[1]}")
    scores = _normalise(img, "image embeddings") @ cls.T
    return scores, scores.argmax(axis=1)


def accuracy(predictions, labels) -> float:
    """Fraction of ``predictions`` equal to ``labels``."""
    p, y = np.asarray(predictions).ravel(), np.asarray(labels).ravel()
    if p.shape != y.shape or p.size == 0:
        raise ValueError(f"accuracy: {p.size} predictions vs {y.size} labels")
    return float(np.mean(p == y))


def linear_probe(train_x, train_y, test_x, test_y, *, num_classes: int | None = None,
                 l2: float = 1e-3, steps: int = 200, optimizer: str = "lbfgs",
                 learning_rate: float = 0.1, standardise: bool = True) -> dict:
    """Multinomial logistic regression on frozen features, trained full-batch with optax.

    Loss: mean cross-entropy + ``l2 * ||W||^2`` (bias not penalised). ``optimizer``:
    "lbfgs" (``steps`` iterations with line search) or "adam" (``steps`` steps at
    ``learning_rate``). Features are standardised with the training mean/std unless
    ``standardise=False``. Labels are integers in ``[0, num_classes)``.

    Returns ``{"accuracy", "per_class_auc", "train_accuracy"}`` and, for two classes,
    ``"auc"`` (AUC of the class-1 probability). ``per_class_auc`` is one-vs-rest, NaN for a
    class absent from (or the only class of) the test labels.
    """
    tx, ty = np.asarray(train_x, np.float32), np.asarray(train_y)
    vx, vy = np.asarray(test_x, np.float32), np.asarray(test_y)
    if tx.ndim != 2 or vx.ndim != 2 or tx.shape[1] != vx.shape[1]:
        raise ValueError(f"linear_probe: features must be [N, D] with one D, got {tx.shape} "
                         f"and {vx.shape}")
    if ty.shape != (len(tx),) or vy.shape != (len(vx),):
        raise ValueError(f"linear_probe: labels {ty.shape}/{vy.shape} do not match features "
                         f"{tx.shape}/{vx.shape}")
    for name, y in (("train_y", ty), ("test_y", vy)):
        if not np.issubdtype(y.dtype, np.integer) and y.dtype != bool:
            raise ValueError(f"linear_probe: {name} must be integer class ids, got {y.dtype}")
    c = int(num_classes) if num_classes is not None else int(max(ty.max(), vy.max())) + 1
    if c < 2 or min(ty.min(), vy.min()) < 0 or max(ty.max(), vy.max()) >= c:
        raise ValueError(f"linear_probe: labels must lie in [0, {c}) with at least 2 classes")
    if optimizer not in ("lbfgs", "adam"):
        raise ValueError(f"optimizer must be 'lbfgs' or 'adam', got {optimizer!r}")
    if standardise:
        mean, std = tx.mean(axis=0), tx.std(axis=0)
        std = np.where(std > 0, std, 1.0)
        tx, vx = (tx - mean) / std, (vx - mean) / std
    params = _fit(jnp.asarray(tx), jnp.asarray(ty, jnp.int32), jnp.float32(l2),
                  jnp.float32(learning_rate), num_classes=c, steps=int(steps),
                  optimizer=optimizer)
    probs = np.asarray(jax.nn.softmax(jnp.asarray(vx) @ params["w"] + params["b"]), np.float64)
    train_pred = np.asarray(jnp.argmax(jnp.asarray(tx) @ params["w"] + params["b"], axis=1))
    out = {"accuracy": accuracy(probs.argmax(axis=1), vy),
           "train_accuracy": accuracy(train_pred, ty)}
    per_class = []
    for k in range(c):
        lab = vy == k
        per_class.append(roc_auc(probs[:, k], lab) if 0 < lab.sum() < len(lab) else float("nan"))
    out["per_class_auc"] = per_class
    if c == 2:
        out["auc"] = per_class[1]
    return out


@functools.partial(jax.jit, static_argnames=("num_classes", "steps", "optimizer"))
def _fit(x, y, l2, learning_rate, *, num_classes, steps, optimizer):
    """Full-batch training of the probe; compiled once per shape and setting."""
    d = x.shape[1]
    params = {"w": jnp.zeros((d, num_classes), jnp.float32),
              "b": jnp.zeros((num_classes,), jnp.float32)}
    onehot = jax.nn.one_hot(y, num_classes)

    def loss_fn(p):
        logp = jax.nn.log_softmax(x @ p["w"] + p["b"])
        return -jnp.mean(jnp.sum(onehot * logp, axis=1)) + l2 * jnp.sum(p["w"] ** 2)

    if optimizer == "lbfgs":
        opt = optax.lbfgs()
        value_and_grad = optax.value_and_grad_from_state(loss_fn)

        def step(carry, _):
            p, state = carry
            value, grad = value_and_grad(p, state=state)
            updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss_fn)
            return (optax.apply_updates(p, updates), state), None
    else:
        opt = optax.adam(learning_rate)

        def step(carry, _):
            p, state = carry
            updates, state = opt.update(jax.grad(loss_fn)(p), state, p)
            return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return params
