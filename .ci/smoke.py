"""A smoke test of an installed adaptive_heads (CI runs it with the wheel, outside the checkout): every head dropped
into a small model, one supervised training step, a save and a strict reload, inference, and the 1.0 checks."""

import io
import sys

import torch
from torch import nn

import adaptive_heads as ah

assert "site-packages" in ah.__file__, f"not the installed package: {ah.__file__}"
for name in ah.HEADS:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 5, 1))
    ah.replace_classifier(model, name, num_classes=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, target = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    with ah.supervise(model, target, optimizer=optimizer) as sup:
        logits = model(images)
        loss = nn.functional.cross_entropy(logits, target) + sup.loss()
    loss.backward()
    optimizer.step()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    fresh = ah.replace_classifier(
        nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 5, 1)), name, num_classes=5
    )
    ah.check_state_dict(fresh, state)
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(images), model.eval()(images))
    assert torch.isfinite(loss.detach()), name
    print(f"{name}: loss {loss.detach().item():.3f}, reloaded logits equal")
print("smoke test OK:", ah.__version__, "torch", torch.__version__, file=sys.stderr)
