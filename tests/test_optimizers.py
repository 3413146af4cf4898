"""The stages' optimizers: fused AdamW, which the configs set, equals the per-tensor loop."""
import torch

from modules.backbone import build_causal_lm


def test_fused_adamw_matches_the_per_tensor_loop(tiny_spec, tokenizer):
    """Configs set AdamW(fused=True): one kernel over all tensors instead of a Python loop per tensor (its speed
    is in the end-to-end number of benchmarks/throughput.py, not timed here). Three steps from the same gradients
    give the same weights within float32 rounding."""
    models = [build_causal_lm(tiny_spec, tokenizer) for _ in range(2)]
    optimizers = [torch.optim.AdamW(models[0].parameters(), lr=1e-2, foreach=False),
                  torch.optim.AdamW(models[1].parameters(), lr=1e-2, fused=True)]
    torch.manual_seed(0)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in models[0].parameters()]
        for model, optimizer in zip(models, optimizers):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
