import torch

from wmtp import IGNORE_INDEX as I
from wmtp import mtp_labels, per_target_to_heads


def test_reference_table_six_tokens_three_heads():
    x = torch.tensor([[10, 11, 12, 13, 14, 15]])  # x0 … x5
    y = mtp_labels(x, 3)[0]
    expected = torch.tensor([
        [11, 12, 13],  # t=0: x1 x2 x3
        [12, 13, 14],
        [13, 14, 15],
        [14, 15, I],   # t=3: x4 x5 .
        [15, I, I],    # t=4: x5 . .
        [I, I, I],     # t=5
    ])
    assert torch.equal(y, expected)


def test_per_target_signal_maps_to_heads_by_one_convention():
    s = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])  # s[j] for target token j
    w = per_target_to_heads(s, 3, fill=-1.0)[0]
    expected = torch.tensor([
        [1.0, 2.0, 3.0],
        [2.0, 3.0, 4.0],
        [3.0, 4.0, 5.0],
        [4.0, 5.0, -1.0],
        [5.0, -1.0, -1.0],
        [-1.0, -1.0, -1.0],
    ])
    assert torch.equal(w, expected)
    # The same index as the labels: the signal of the token each head predicts.
    x = torch.arange(6).unsqueeze(0) + 10
    y = mtp_labels(x, 3)
    valid = y != I
    assert torch.equal(per_target_to_heads(x.float(), 3)[valid], y[valid].float())


def test_padding_masks_source_and_target():
    x = torch.tensor([[0, 0, 21, 22, 23, 24], [31, 32, 33, 34, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    y = mtp_labels(x, 2, attention_mask=mask)
    assert torch.equal(y[0, :, 0], torch.tensor([I, I, 22, 23, 24, I]))
    assert torch.equal(y[0, :, 1], torch.tensor([I, I, 23, 24, I, I]))
    assert torch.equal(y[1, :, 0], torch.tensor([32, 33, 34, I, I, I]))
    assert torch.equal(y[1, :, 1], torch.tensor([33, 34, I, I, I, I]))


def test_packed_documents_do_not_predict_across_boundaries():
    x = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2]])
    y = mtp_labels(x, 3, document_ids=docs)[0]
    expected = torch.tensor([
        [2, 3, I],
        [3, I, I],
        [I, I, I],  # t=2 is the last token of document 0
        [5, I, I],
        [I, I, I],
        [7, I, I],
        [I, I, I],
    ])
    assert torch.equal(y, expected)


def test_prompt_tokens_are_never_targets_but_are_context():
    x = torch.tensor([[1, 2, 3, 4, 5]])
    prompt = torch.tensor([[True, True, True, False, False]])
    y = mtp_labels(x, 2, prompt_mask=prompt)[0]
    expected = torch.tensor([[I, I], [I, 4], [4, 5], [5, I], [I, I]])
    assert torch.equal(y, expected)


def test_more_heads_than_sequence():
    y = mtp_labels(torch.tensor([[5, 6]]), 4)
    assert torch.equal(y[0, 0], torch.tensor([6, I, I, I]))
    assert (y[0, 1] == I).all()
