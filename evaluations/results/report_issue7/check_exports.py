"""Load each demo export with its client and compare logits with the compressed model (w4-gptq-sym-eora16)."""
# Run after commands.sh (it reads /tmp/issue7); its output is at the end of exports.txt.
import torch, onnxruntime
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from compress.formats import read_quantized
from compress.formats.native import load_compressed

W = "/tmp/issue7"
compressed = load_compressed(f"{W}/w4-gptq-sym-eora16")
tok = AutoTokenizer.from_pretrained(f"{W}/w4-gptq-sym-eora16")
ids = torch.tensor([tok(open("compress/demo/heldout.txt").read()[:4000])["input_ids"][:128]])
with torch.no_grad():
    ref = compressed(input_ids=ids).logits
def rel(x): return ((x - ref).abs().max() / ref.abs().max()).item()

dense = AutoModelForCausalLM.from_pretrained(f"{W}/export-dense", dtype=torch.float32).eval()
with torch.no_grad():
    print(f"dense (transformers, fp16 weights): relative max logit error {rel(dense(input_ids=ids).logits):.2e}")

checkpoint = read_quantized(f"{W}/export-gptq")
weights, fmt = checkpoint.weights, checkpoint.format
base = AutoModelForCausalLM.from_pretrained("compress/demo", dtype=torch.float32).eval()
with torch.no_grad():
    for name, w in weights.items():
        base.get_submodule(name).weight.copy_(w)
peft = PeftModel.from_pretrained(base, f"{W}/export-gptq/adapter").eval()
with torch.no_grad():
    print(f"gptq ({fmt}, dequantized) + PEFT adapter: relative max logit error {rel(peft(input_ids=ids).logits):.2e}")

session = onnxruntime.InferenceSession(f"{W}/export-onnx/model.onnx", providers=["CPUExecutionProvider"])
got = torch.from_numpy(session.run(["logits"], {"input_ids": ids.numpy()})[0])
print(f"onnx (onnxruntime, [1, 128] input): relative max logit error {rel(got):.2e}")
native = load_compressed(f"{W}/export-native")
with torch.no_grad():
    equal = torch.equal(native(input_ids=ids).logits, ref)
    print(f"native copy (load_compressed, checksums verified): logits equal: {equal}")
