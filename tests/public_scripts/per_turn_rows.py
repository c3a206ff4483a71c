"""Public-package side of tests/test_data_per_turn_public.py (runs in the public venv).

usage: per_turn_rows.py JOBS_JSON

JOBS_JSON lists jobs {"tokenizer": DIR, "records": JSONL, "out": JSON, "lengths": [L, ...]};
each writes {max_length: {"input_ids", "loss_mask", "seq_len"}} to its "out".

Runs the public package's own preprocessing (`build_speculator_training_dataset`, one row
per assistant turn, masks from render boundaries) on the records. Its renders normally
come from a vLLM server's /v1/chat/completions/render endpoint, which applies the
tokenizer's chat template and tokenizes the text without adding special tokens, cut to
`truncate_prompt_tokens` from the right; with no server here, `render_conversation` is
replaced by exactly that, done locally with the same tokenizer.
"""

import json
import sys

from datasets import Dataset
from transformers import AutoTokenizer

import speculators.data_generation.preprocessing as prep



def run_job(tok_dir, records_path, out_path, lengths):
    tok = AutoTokenizer.from_pretrained(tok_dir)

    def local_render(endpoint, messages, *, add_generation_prompt, tools=None, chat_template_kwargs=None,
                     truncate_prompt_tokens=None, truncation_side=None, timeout=None):
        text = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                       tokenize=False, **(chat_template_kwargs or {}))
        ids = tok.encode(text, add_special_tokens=False)
        if truncate_prompt_tokens is not None:
            ids = ids[:truncate_prompt_tokens] if truncation_side == "right" else ids[-truncate_prompt_tokens:]
        return ids

    prep.render_conversation = local_render
    rows = {"conversations": [], "tools": []}
    with open(records_path) as f:
        for line in f:
            record = json.loads(line)
            rows["conversations"].append(record["messages"])
            rows["tools"].append(json.dumps(record["tools"]) if record.get("tools") else "")
    result = {}
    for max_length in lengths:
        ds = prep.build_speculator_training_dataset(Dataset.from_dict(rows), processor=tok, max_length=max_length,
                                                    num_proc=1, render_endpoint="http://local")
        ds = ds.with_format(None)
        cols = ("input_ids", "loss_mask", "seq_len")
        result[max_length] = {k: list(ds[k]) if k in ds.column_names else [] for k in cols}
        print(tok_dir, max_length, len(ds), "rows")
    with open(out_path, "w") as f:
        json.dump(result, f)


with open(sys.argv[1]) as f:
    for job in json.load(f):
        run_job(job["tokenizer"], job["records"], job["out"], job["lengths"])
