"""Run vLLM's offline engine with an EAGLE-3 draft and record every greedy draft it proposes.

Subprocess of tests/test_model_options_vllm.py (VLLM_TARGET_DEVICE=cpu, in-process engine
so the proposer can be observed).  argv: a JSON spec {"verifier", "drafts": [dir...], "k",
"prompts": [[ids]...], "max_tokens"}; prints one `RESULT <json>` line with, per draft and
prompt, the generated token ids and the list of draft-token lists vLLM proposed.
"""

import json
import os
import sys
import time

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main() -> None:
    from vllm.v1.spec_decode import llm_base_proposer

    recorded: list[list[int]] = []
    original = llm_base_proposer.SpecDecodeBaseProposer.propose

    def propose(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        ids = out[0] if isinstance(out, tuple) else out
        recorded.append(ids.detach().cpu().tolist()[0])
        return out

    llm_base_proposer.SpecDecodeBaseProposer.propose = propose
    from vllm import LLM, SamplingParams

    spec = json.loads(sys.argv[1])
    results = []
    for draft in spec["drafts"]:
        t0 = time.time()
        llm = LLM(
            model=spec["verifier"],
            speculative_config={"model": draft, "method": "eagle3", "num_speculative_tokens": spec["k"]},
            enforce_eager=True, max_model_len=256, max_num_seqs=1, dtype="float32", seed=0,
        )
        started = time.time() - t0
        runs = []
        for prompt in spec["prompts"]:
            recorded.clear()
            params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
            out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
            runs.append({"prompt": prompt, "output": list(out[0].outputs[0].token_ids), "drafts": list(recorded)})
        results.append({"draft": draft, "startup_s": started, "total_s": time.time() - t0, "runs": runs})
        del llm
        import gc

        gc.collect()
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
