"""Stage "verify": ArcFace embeddings of every kept face, then per person (a GroupByKey on the person id)
the person's identity = the dominant cluster of mutually similar faces, and per image the face in it.

Embedding: the project's JAX IResNet through `FaceSimScorer.embed_crops` (fixed-size batches, sharded
over the worker's devices), cached in DST/_work/embeddings (image path + content hash + ArcFace
fingerprint + the faces' landmarks).

Clustering: DBSCAN (`dbscan` below: scikit-learn's algorithm and labels, in numpy) on the cosine
distance 1 - cos between all kept faces of the person, eps = 1 - `verify_threshold` (so two faces are
neighbours when their cosine is >= the threshold; 0.4 by default: insightface's ArcFace models put the
same person's photos at 0.5-0.8 and different people below 0.3), `min_samples` = `verify_min_samples`
(2: a face needs one similar face in another image to start a cluster). Two faces of the same image are
never neighbours (one photo cannot show the person twice), so the other people in a group photo form
their own clusters or stay noise. DBSCAN rather than plain connected components because `min_samples` >
2 stops one ambiguous face from chaining two identities into one cluster. Written here rather than
imported from scikit-learn: a person has tens of faces, the dense distance matrix is all the algorithm
needs, and importing `sklearn.cluster` costs each worker process about a second of CPU (and the install
a dependency). The dominant cluster is the one that covers the most images; a tie between two clusters
leaves the identity undecided and the person is rejected.

Per image: its face in the dominant cluster (when several are, the one with the highest mean cosine to
the cluster's faces in the other images; its face box can be smaller than a stranger's: "images with
several people keep the right one"). Rejected: an image with no face in the cluster ("not the person's
identity": an intruder photo in the folder), every image of a person whose faces form no cluster, and
the images of a person left with fewer than `min_images` verified images.
"""

from __future__ import annotations

import dataclasses

import apache_beam as beam
import numpy as np

from persongen_jax.data import format as fmt
from persongen_jax.data.build.common import REJECTED, Item, StageDoFn, WorkCache
from persongen_jax.data.build.faces import face_scorer
from persongen_jax.data.build.settings import cache_key


class EmbedFaces(StageDoFn):
    """Batches of Items (beam.BatchElements) -> the same Items with `embeddings` (crops dropped): the raw
    ArcFace outputs (not L2-normalised; PhotoMaker V2's `id_embeds` are these, and the record keeps the
    verified face's); verification normalises them."""

    stage = "embed"

    def setup(self):
        """Once per worker: ArcFace (faces.face_scorer) and the embeddings cache."""
        self.scorer = face_scorer(self.settings)
        self.cache = WorkCache(self.settings.dst, "embeddings")

    def run(self, batch: list[Item]):
        """Embeds the aligned crops of a batch (cached ones reused); drops the crops."""
        s = self.settings
        keys = [cache_key("embeddings_raw", it.image, it.sha256, s.arcface_fingerprint, self.scorer.crop_size,
                          [f["kps"] for f in it.faces]) for it in batch]

        def compute(todo):
            emb = self.scorer.embed_crops(np.concatenate([batch[i].crops for i in todo]), normalize=False)
            ends = np.cumsum([len(batch[i].faces) for i in todo])
            return [fmt.pack_float32(e) for e in np.split(emb, ends[:-1])]

        found, computed = self.cache.fetch(keys, compute)
        self.count("computed", computed, group="embeddings")
        self.count("cached", len(batch) - computed, group="embeddings")
        for item, e in zip(batch, found):
            yield dataclasses.replace(item, embeddings=fmt.unpack_float32(e), crops=None)


def dbscan(dist: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """DBSCAN labels (-1 = noise) of a symmetric distance matrix [F, F]: the labels of scikit-learn's
    `DBSCAN(eps, min_samples=min_samples, metric="precomputed").fit_predict(dist)`. Neighbours are at
    distance <= eps (a point is its own neighbour); a core point has >= min_samples neighbours; clusters
    are the connected core points plus their neighbours, numbered in the order of their first core
    point; a border point next to two clusters joins the one numbered first (scikit-learn's order)."""
    near = dist <= eps
    core = near.sum(axis=1) >= min_samples
    labels = np.full(len(dist), -1, np.intp)
    n = 0
    for start in np.flatnonzero(core):
        if labels[start] != -1:
            continue
        labels[start], stack = n, [start]
        while stack:  # depth-first over core points; border points are labelled, not expanded
            for j in np.flatnonzero(near[stack.pop()] & (labels == -1)):
                labels[j] = n
                if core[j]:
                    stack.append(j)
        n += 1
    return labels


def dominant_identity(embeddings: np.ndarray, owner: np.ndarray, threshold: float,
                      min_samples: int) -> tuple[np.ndarray, int | None, np.ndarray]:
    """embeddings [F, D] (unit), owner [F] (image index of each face) -> (DBSCAN labels [F], -1 = noise;
    the dominant cluster's label or None when there is none or two tie; cosine similarities [F, F])."""
    sim = np.clip(embeddings @ embeddings.T, -1.0, 1.0)
    dist = 1.0 - sim
    dist[owner[:, None] == owner[None, :]] = 2.0  # never neighbours: one photo cannot show the person twice
    np.fill_diagonal(dist, 0.0)
    labels = dbscan(dist, max(1.0 - threshold, 1e-9), min_samples)
    covered = {int(c): len(set(owner[labels == c].tolist())) for c in np.unique(labels) if c >= 0}
    if not covered:
        return labels, None, sim
    best = max(covered.values())
    winners = [c for c, n in covered.items() if n == best]
    return labels, (winners[0] if len(winners) == 1 else None), sim


def verify_person(items: list[Item], s) -> tuple[list[Item], list[tuple[Item, str, str]]]:
    """One person's Items (with `faces` and raw `embeddings`) -> (new verified Items with `face` set -- its raw
    ArcFace embedding under "embedding" --, rejects as (item, reason, detail)); see the module doc."""
    items = sorted(items, key=lambda it: it.image)  # the clustering must not depend on arrival order
    if len(items) < s.min_images:
        return [], [(it, "too few images", f"{len(items)} image(s) with a face < min_images {s.min_images}")
                    for it in items]
    owner = np.concatenate([np.full(len(it.faces), i) for i, it in enumerate(items)])
    raw = np.concatenate([it.embeddings for it in items]).astype(np.float32)
    emb = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)  # cosines need unit vectors
    labels, dominant, sim = dominant_identity(emb, owner, s.verify_threshold, s.verify_min_samples)
    if dominant is None:
        sizes = sorted((len(set(owner[labels == c].tolist())) for c in set(labels.tolist()) if c >= 0), reverse=True)
        why = (f"two identities tie ({sizes[0]} images each)" if sizes else
               f"no two images share a face at cosine >= {s.verify_threshold}")
        return [], [(it, "no dominant identity", why) for it in items]
    in_cluster = labels == dominant
    verified, rejects = [], []
    for i, it in enumerate(items):
        mine = np.flatnonzero(owner == i)
        others = in_cluster & (owner != i)
        cands = [f for f in mine if in_cluster[f]]
        if not cands:
            best = float(sim[np.ix_(mine, np.flatnonzero(others))].max()) if others.any() else float("nan")
            rejects.append((it, "not the person's identity",
                            f"best cosine to the person's faces {best:.3f} < {s.verify_threshold}"))
            continue
        score = {f: float(sim[f, others].mean()) if others.any() else 0.0 for f in cands}
        pick = max(cands, key=lambda f: score[f])
        face = dict(it.faces[int(pick - mine[0])], identity_cos=round(score[pick], 4), embedding=raw[pick])
        verified.append(dataclasses.replace(it, face=face, faces=[], embeddings=None))
    if len(verified) < s.min_images:
        rejects += [(it, "too few images", f"{len(verified)} verified image(s) < min_images {s.min_images}")
                    for it in verified]
        verified = []
    return verified, rejects


class VerifyPerson(StageDoFn):
    """(person_id, [Item]) -> verified Items (with `face`) and rejects."""

    stage = "verify"

    def run(self, element):
        """One person's Items -> its verified Items and the rejects (`verify_person`)."""
        verified, rejects = verify_person(list(element[1]), self.settings)
        for it, reason, detail in rejects:
            yield self.rejected(it, reason, detail)
        if verified:
            self.kept(len(verified))
            yield from verified


class VerifyIdentity(beam.PTransform):
    """PCollection[Item with embeddings] -> {"verified": Items with `face`, "rejected": rejects}."""

    def __init__(self, settings):
        super().__init__()
        self.settings = settings

    def expand(self, items):
        """Key by person, GroupByKey, verify each person."""
        return (items
                | "ByPerson" >> beam.Map(lambda it: (it.person_id, it))
                | "GroupByPerson" >> beam.GroupByKey()
                | "Verify" >> beam.ParDo(VerifyPerson(self.settings)).with_outputs(REJECTED, main="verified"))
