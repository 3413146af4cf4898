"""The shared-prompt layouts (`modules.layout`) on literal masks."""
import torch

from modules import layout as L


def test_shared_prompt_layout_on_one_group_with_a_padded_prompt_and_an_early_eos():
    """P = 2, L = 2, K = 2. Row a = [pad p1 a0 a1], row b = [pad p1 b0 pad] (b stopped after b0). Packed columns:
    [pad p1 | a0 a1 | b0 b1] = flat indices [0 1 | 2 3 | 6 7] (row b starts at 4).
    Positions are each row's own (cumsum of its mask - 1, clamped): a [0 0 1 2], b [0 0 1 1] -> [0 0 1 2 1 1].
    Attention (query rows, key columns): pad sees only itself; p1 sees p1; a0 sees p1 a0; a1 sees p1 a0 a1;
    b0 sees p1 b0 (not a's tokens); b1 (padding) sees p1 b0 and itself.
    keep: p1 predicts a0, a0 predicts a1, p1 predicts b0, b0 predicts b1 -> [1 2 1 4]."""
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]])
    gather, positions, allowed, keep = L.shared_prompt_layout(mask, prompt_length=2, group_size=2)
    assert gather.tolist() == [[0, 1, 2, 3, 6, 7]]
    assert positions.tolist() == [[0, 0, 1, 2, 1, 1]]
    assert allowed.shape == (1, 1, 6, 6)
    assert allowed[0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0],
                                            [0, 1, 0, 0, 0, 0],
                                            [0, 1, 1, 0, 0, 0],
                                            [0, 1, 1, 1, 0, 0],
                                            [0, 1, 0, 0, 1, 0],
                                            [0, 1, 0, 0, 1, 1]]
    assert keep.tolist() == [1, 2, 1, 4]


def test_shared_prompt_layout_puts_each_group_in_its_own_row():
    """Two groups of K = 2, P = 1, L = 1, no padding: rows 0, 1 share prompt 0 and rows 2, 3 prompt 1. Each row of
    the (4, 2) input starts at 2 * row, so group 0 packs [0 | 1 3] and group 1 [4 | 5 7]; positions [0 1 1]."""
    gather, positions, allowed, keep = L.shared_prompt_layout(torch.ones(4, 2, dtype=torch.long), 1, 2)
    assert gather.tolist() == [[0, 1, 3], [4, 5, 7]]
    assert positions.tolist() == [[0, 1, 1], [0, 1, 1]]
    assert allowed[:, 0].int().tolist() == [[[1, 0, 0], [1, 1, 0], [1, 0, 1]]] * 2
    assert keep.tolist() == [0, 0]


def test_packed_prompt_layout_literal():
    """Docstring example: prompt [pad p1], response a = [a0 pad], b = [b0 b1] pack to [p1 a0 b0 b1]."""
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]])
    gather, position_ids, allowed, source = L.packed_prompt_layout(mask, prompt_length=2, group_size=2)
    assert gather.tolist() == [[1, 2, 6, 7]] and position_ids.tolist() == [[0, 1, 1, 2]]
    assert allowed.shape == (1, 1, 4, 4)
    assert allowed[0, 0].int().tolist() == [[1, 0, 0, 0],     # p1
                                            [1, 1, 0, 0],     # a0: p1, itself
                                            [1, 0, 1, 0],     # b0: p1, itself (not a0)
                                            [1, 0, 1, 1]]     # b1: p1, b0, itself
    real = mask[:, 2:].bool()
    assert source[real].tolist() == [0, 0, 2]                 # a0 <- p1, b0 <- p1, b1 <- b0
    # two groups of different lengths: rows as long as the longer one, the shorter one's tail padded
    two = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 0], [0, 1, 1, 0]])
    gather, position_ids, allowed, source = L.packed_prompt_layout(two, prompt_length=2, group_size=2)
    assert gather.shape == (2, 5) and gather[0].tolist() == [0, 1, 2, 6, 7]
    assert gather[1, :3].tolist() == [9, 10, 14] and position_ids[1, :3].tolist() == [0, 1, 1]
    assert not allowed[1, 0, :3, 3:].any()                    # nobody attends to the padded tail
    assert source[two[:, 2:].bool()].tolist() == [1, 1, 3, 5, 5]   # the second row starts at packed index 5


def test_packed_last_token_literal():
    """Docstring example: rows ending at a0 and b1 of [p1 a0 b0 b1] read packed indices [1, 3]; in the two-group
    layout above, the second group starts at 5; a row with no response token reads its prompt's last token, which
    the group's first row holds."""
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]])
    gather = L.packed_prompt_layout(mask, 2, 2)[0]
    assert L.packed_last_token(mask, 2, 2, gather).tolist() == [1, 3]
    two = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 0], [0, 1, 1, 0]])
    gather = L.packed_prompt_layout(two, 2, 2)[0]                  # [[p0 p1 a0 b0 b1], [p1 c0 d0 pad pad]]
    assert L.packed_last_token(two, 2, 2, gather).tolist() == [2, 4, 6, 7]
    empty = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])              # row 1: no response token
    gather = L.packed_prompt_layout(empty, 2, 2)[0]
    assert gather.tolist() == [[0, 1, 2]]
    assert L.packed_last_token(empty, 2, 2, gather).tolist() == [2, 1]
