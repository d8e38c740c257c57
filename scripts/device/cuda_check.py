"""A few CUDA operations with autograd, for call1.sh to see that the multi-process service (MPS) serves two
processes at once before the experiment relies on it."""

import torch

weight = torch.randn(512, 512, device="cuda", requires_grad=True)
for _ in range(20):
    (torch.randn(256, 512, device="cuda") @ weight).square().mean().backward()
torch.cuda.synchronize()
print("cuda: ok")
