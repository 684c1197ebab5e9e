"""GPU-machine smoke test: the package under the GPU image's transformers, a hybrid student on CUDA
(fla prefill == torch reference; prefill + decode == full forward), save -> load round trip."""

import tempfile

import torch
import transformers

import mmmamba
from mmmamba import HybridCache, MMMambaConfig, MMMambaForCausalLM
from mmmamba.distill.seed import seed_student
from mmmamba.io import load_model, save_model

print("transformers", transformers.__version__, "torch", torch.__version__, torch.cuda.get_device_name())
torch.manual_seed(0)
cfg = MMMambaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64)
teacher = MMMambaForCausalLM(cfg).eval()
student = seed_student(teacher, "every:2").cuda().eval()
for layer in student.model.layers:  # non-trivial SSM parameters
    m = layer.mixer
    if hasattr(m, "dt_proj"):
        torch.nn.init.normal_(m.dt_proj.weight, std=0.05)
        torch.nn.init.normal_(m.conv1d.weight, std=0.5)
x = torch.randint(0, 1000, (2, 300), device="cuda")
with torch.no_grad():
    for b in ["fla", "torch"]:
        for layer in student.model.layers:
            if hasattr(layer.mixer, "ssd_backend"):
                layer.mixer.ssd_backend = b
        out = student(x).logits
        if b == "fla":
            fla_out = out
    print("fla vs torch logits rel err", ((fla_out - out).norm() / out.norm()).item())
    cache = HybridCache(student.config)
    a = student(x[:, :200], cache=cache, use_cache=True).logits
    steps = [student(x[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(200, 300)]
    inc = torch.cat([a] + steps, 1)
    print("prefill+decode vs full rel err", ((inc - out).norm() / out.norm()).item())
with tempfile.TemporaryDirectory() as d:
    save_model(student, d)
    re = load_model(d, device="cuda")
    same = all(torch.equal(p, q) for p, q in zip(student.state_dict().values(), re.state_dict().values()))
    print("save/load bit-identical:", same, "| auto class:", type(re).__name__, mmmamba.__version__)
