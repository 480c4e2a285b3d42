import pytest
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

from finetune.adapter.config import AdapterTrainConfig, LossConfig
from finetune.adapter.export import export_adapter_model
from finetune.adapter.losses import infonce_loss, triplet_loss
from finetune.adapter.modules import build_adapter, load_adapter, save_adapter
from finetune.adapter.negatives import NegativeSampler, relevance_keys
from finetune.adapter.train import train_adapter
from finetune.errors import FinetuneError


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_adapter_is_the_identity_at_init(kind):
    torch.manual_seed(0)
    q = _unit(16, 24)
    assert torch.allclose(build_adapter(kind, 24, hidden_dim=40)(q), q, atol=1e-6)


def _toy_problem(n=48, d=16):
    """Queries are a fixed rotation of their documents: the base model ranks poorly, an adapter can fix it."""
    docs = _unit(n, d, seed=1)
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(2)))
    queries = F.normalize(docs @ rotation + 0.05 * _unit(n, d, seed=3), dim=-1)
    pairs = torch.stack([torch.arange(n), torch.arange(n)], dim=1)
    return queries, docs, pairs


def _top1(adapter, queries, docs):
    with torch.no_grad():
        return (adapter(queries) @ docs.T).argmax(1).eq(torch.arange(len(queries))).float().mean().item()


@pytest.mark.parametrize("kind,loss", [("linear", "mnrl"), ("linear", "triplet"), ("mlp", "mnrl"), ("mlp", "triplet")])
def test_training_lowers_the_loss_and_fixes_the_ranking(kind, loss):
    queries, docs, pairs = _toy_problem()
    torch.manual_seed(0)
    adapter = build_adapter(kind, 16, hidden_dim=64)
    before = _top1(adapter, queries, docs)
    sampler = NegativeSampler(docs, relevance_keys(pairs, len(docs)))
    config = AdapterTrainConfig(epochs=60, batch_size=16, lr=1e-2, patience=None, warmup_ratio=0.0)
    history = train_adapter(adapter, queries, docs, pairs, sampler, LossConfig(type=loss, margin=0.5), config, seed=0)
    assert history[-1]["loss"] < 0.5 * history[1]["loss"]
    assert _top1(adapter, queries, docs) > before + 0.3


def test_early_stopping_restores_the_best_epoch():
    queries, docs, pairs = _toy_problem()
    adapter = build_adapter("linear", 16)
    scores = iter([0.5, 0.9, 0.4, 0.3, 0.2, 0.1])
    snapshots = []

    def validate(a):
        snapshots.append(a.delta.weight.detach().clone())
        return next(scores)

    config = AdapterTrainConfig(epochs=20, batch_size=16, lr=1e-2, patience=2)
    history = train_adapter(
        adapter,
        queries,
        docs,
        pairs,
        NegativeSampler(docs, relevance_keys(pairs, 48)),
        LossConfig(),
        config,
        0,
        validate,
    )
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]  # stopped after 2 epochs without gain
    assert torch.equal(adapter.delta.weight, snapshots[1])


def test_nan_loss_stops_with_a_clear_error():
    queries, docs, pairs = _toy_problem()
    queries[0] = float("nan")
    with pytest.raises(FinetuneError, match="loss is nan"):
        train_adapter(
            build_adapter("linear", 16),
            queries,
            docs,
            pairs,
            NegativeSampler(docs, relevance_keys(pairs, 48)),
            LossConfig(),
            AdapterTrainConfig(epochs=1, batch_size=48),
            0,
        )


def test_random_negatives_are_never_relevant():
    docs = _unit(6, 8)
    pairs = torch.tensor([[0, 0], [0, 1], [0, 2], [0, 3], [0, 4], [1, 5]])
    sampler = NegativeSampler(docs, relevance_keys(pairs, 6), per_query=3)
    _, rows = sampler.sample(torch.tensor([0] * 50 + [1] * 50), generator=torch.Generator().manual_seed(0))
    assert (rows[:50] == 5).all() and not (rows[50:] == 5).any()


def test_given_negatives_are_drawn_from_the_data():
    docs = _unit(10, 8)
    pairs = torch.tensor([[0, 0], [1, 1]])
    given = torch.tensor([[7, 8], [-1, -1]])
    sampler = NegativeSampler(docs, relevance_keys(pairs, 10), per_query=20, given=given)
    _, rows = sampler.sample(torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))
    assert set(rows[0].tolist()) == {7, 8} and 1 not in rows[1].tolist()


def test_losses_on_hand_made_tensors():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert infonce_loss(q, q, torch.zeros(2, 2, dtype=torch.bool), 0.05) < 1e-6
    assert infonce_loss(q, q.flip(0), torch.zeros(2, 2, dtype=torch.bool), 0.05) > 10
    exclude = torch.tensor([[False, True], [True, False]])
    assert infonce_loss(q, q.flip(0), exclude, 0.05) == pytest.approx(0.0, abs=1e-6)  # only the target remains
    assert triplet_loss(q, q, q.flip(0).unsqueeze(1), margin=0.5) == 0
    assert triplet_loss(q, q.flip(0), q.unsqueeze(1), margin=0.5) == pytest.approx(2**0.5 + 0.5, abs=1e-4)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_export_round_trip_matches_the_toolkit(tmp_path, tiny_model, kind):
    base = SentenceTransformer(str(tiny_model), device="cpu")
    torch.manual_seed(0)
    adapter = build_adapter(kind, 32, hidden_dim=48)
    with torch.no_grad():  # a trained-looking adapter: move every weight off its init
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn_like(p))
    texts = ["how do i fix the roof?", "what is a bygglov", "radon in the basement"]
    base_emb = base.encode(texts, convert_to_tensor=True)
    with torch.no_grad():
        expected = adapter(base_emb.clone())

    export_adapter_model(base, adapter, tmp_path / "model", query_prompt=None)
    loaded = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    assert torch.allclose(loaded.encode_query(texts, convert_to_tensor=True), expected, atol=1e-5)
    assert torch.allclose(loaded.encode_document(texts, convert_to_tensor=True), base_emb, atol=1e-5)
    assert not (tmp_path / "model.partial").exists()


def test_export_stores_the_query_prompt(tmp_path, tiny_model):
    base = SentenceTransformer(str(tiny_model), device="cpu")
    adapter = build_adapter("linear", 32)
    export_adapter_model(base, adapter, tmp_path / "m", query_prompt="query: ")
    loaded = SentenceTransformer(str(tmp_path / "m"), device="cpu")
    prompted = base.encode(["query: roof"], convert_to_tensor=True)
    assert torch.allclose(loaded.encode_query(["roof"], convert_to_tensor=True), prompted, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_saved_adapter_reloads(tmp_path, kind):
    adapter = build_adapter(kind, 12, hidden_dim=20)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p))
    save_adapter(adapter, tmp_path)
    q = _unit(4, 12)
    assert torch.equal(load_adapter(tmp_path)(q), adapter(q))


def test_adapter_weights_of_the_wrong_shape(tmp_path):
    save_adapter(build_adapter("linear", 12), tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"type": "linear", "dim": 16}')
    with pytest.raises(FinetuneError, match=r"tensor 'delta.weight' is \(12, 12\), expected \(16, 16\)"):
        load_adapter(tmp_path)


def test_infonce_without_exclusions_equals_sentence_transformers_mnrl():
    """The adapter's loss is MultipleNegativesRankingLoss: same tensors, same number (temperature 0.05 = scale 20)."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from finetune.adapter.losses import infonce_loss

    g = torch.Generator().manual_seed(0)
    q, pos, neg = (torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1) for _ in range(3))
    ours = infonce_loss(q, torch.cat([pos, neg]), torch.zeros(8, 16, dtype=torch.bool), temperature=0.05)
    mnrl = MultipleNegativesRankingLoss(model=None, scale=20.0).compute_loss_from_embeddings(
        [q, pos, neg], labels=None
    )
    assert torch.allclose(ours, mnrl, atol=1e-6)


def test_warmup_then_linear_decay_schedule():
    from finetune.adapter.train import linear_warmup_decay

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = linear_warmup_decay(optimizer, warmup=2, total=6)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])


def test_keep_best_keeps_the_first_of_tied_epochs_and_counts_stale_ones():
    """Validation ties keep the earlier epoch (fewer steps, same score); each epoch without a gain counts once."""
    from finetune.adapter.checkpoint import TrainState

    adapter = build_adapter("linear", 4)
    state = TrainState(adapter, None, None, None, history=[])
    for epoch, score in enumerate([0.3, 0.5, 0.5, 0.4]):
        with torch.no_grad():
            adapter.delta.weight.fill_(epoch)
        state.keep(epoch, score)
    assert (state.best, state.best_epoch, state.stale) == (0.5, 1, 2)
    assert bool((state.best_state["delta.weight"] == 1).all())
    state.keep(4, 0.6)
    assert (state.best_epoch, state.stale) == (4, 0)
