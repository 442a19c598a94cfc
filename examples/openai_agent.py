"""An agent written against the official `openai` client, attached to Tether unchanged.

Nothing in this file knows about Tether: point the client at the sidecar's OpenAI-compatible
front with the standard environment variables and every call gets the sidecar's policies,
journal and telemetry:

    OPENAI_BASE_URL=http://127.0.0.1:7701/v1 OPENAI_API_KEY=unused python examples/openai_agent.py

(`make demo` does exactly that.) The model names are the sidecar's routes; with no `routes`
configured, each model upstream is offered under its own name (`llm` in the defaults).
"""

from __future__ import annotations

import argparse
import json

from openai import OpenAI

TOOLS = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="llm")
    parser.add_argument("--questions", type=int, default=3)
    args = parser.parse_args()
    client = OpenAI()  # OPENAI_BASE_URL and OPENAI_API_KEY from the environment
    print("openai agent: models offered:", ", ".join(m.id for m in client.models.list()))
    for n in range(args.questions):
        messages = [{"role": "user", "content": f"question {n}: what is new?"}]
        raw = client.chat.completions.with_raw_response.create(
            model=args.model, messages=messages, tools=TOOLS
        )
        answer = raw.parse()
        calls = answer.choices[0].message.tool_calls or []
        print(f"  question {n}: answered by {raw.headers.get('x-tether-upstream')} "
              f"(attempts {raw.headers.get('x-tether-attempts')}, sidecar overhead "
              f"{raw.headers.get('x-tether-overhead-ms')} ms), tool calls: "
              f"{[c.function.name for c in calls]}")  # fmt: skip
        for call in calls:
            messages += [answer.choices[0].message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id,
                          "content": json.dumps({"result": "found"})}]  # fmt: skip
        final = client.chat.completions.create(model=args.model, messages=messages)
        print(f"    final: {final.choices[0].message.content}")
    stream = client.chat.completions.create(
        model=args.model, messages=[{"role": "user", "content": "stream please"}], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    print(f"  streamed: {text!r}")
    vectors = client.embeddings.create(model=args.model, input=["tether", "agents"])
    print(f"  embeddings: {len(vectors.data)} vectors of {len(vectors.data[0].embedding)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
