from fedgrow_core import DualLiGO, GrownModel, LiGO, TransformerShape, get_family, growth_accounting
from tests.conftest import make_bert


def test_accounting_matches_counts_from_the_operator_shapes():
    small = make_bert(layers=2, hidden=32, heads=4, ffn=64)
    fam = get_family("bert")
    k, m, t = fam.shape(small), TransformerShape(3, 48, 96, 6), TransformerShape(4, 64, 128, 8)
    grown = GrownModel(fam, small, DualLiGO(LiGO(k, m, tie_layers=True), LiGO(m, t)), num_labels=3)
    acc = growth_accounting(grown)

    def ligo_params(src, tgt, tied):
        layers = 1 if tied else tgt.layers
        depth = 16 * tgt.layers * src.layers
        res = (tgt.hidden - src.hidden) * src.hidden
        attn = 3 * layers * (tgt.hidden - src.hidden) * src.hidden
        ffn = layers * (tgt.ffn - src.ffn) * src.ffn
        # trainable split weights of the spaces with an input side: res, v, ffn
        split = (tgt.hidden - src.hidden) + layers * (tgt.hidden - src.hidden) + layers * (tgt.ffn - src.ffn)
        return depth + res + attn + ffn + split

    assert acc.local_params == ligo_params(k, m, True)
    assert acc.global_params == ligo_params(m, t, False)
    assert acc.head_params == t.hidden * 3 + 3
    assert acc.trainable_params == acc.local_params + acc.global_params + acc.head_params
    rows = 16 * t.layers + (t.hidden - m.hidden) + 3 * t.layers * (t.hidden - m.hidden) + t.layers * (t.ffn - m.ffn)
    rows += 1 + t.layers + t.layers  # split.res (one row), split.v and split.ffn (a row per layer)
    assert acc.global_bytes == {
        "float32": 4 * acc.global_params,
        "float16": 2 * acc.global_params,
        "int8": acc.global_params + 4 * rows,  # one float32 scale per row of every tensor
    }
    # target: BERT encoder of shape t with the small model's vocabulary (100),
    # positions (32), token types (2), plus pooler and classifier
    d, f, L = t.hidden, t.ffn, t.layers
    per_layer = 4 * (d * d + d) + 2 * d * f + f + d + 4 * d
    embed = (100 + 32 + 2) * d + 2 * d
    expected = embed + L * per_layer + d * d + d + d * 3 + 3
    assert acc.target_params == expected
    assert acc.target_model_bytes == 4 * expected
