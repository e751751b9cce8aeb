"""An OpenAI-compatible chat endpoint as an extractor (e.g. a stronger model served elsewhere).

The API key is read from an environment variable at call time and never stored in a config,
printed, or included in an error message.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from oel_ray.types import Sampling


class ChatEndpoint:
    def __init__(self, base_url: str, model: str, *, api_key_env: str = "", timeout_s: float = 600,
                 max_concurrency: int = 8):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_concurrency = max_concurrency

    def __repr__(self) -> str:  # never show the key
        return f"ChatEndpoint({self.url!r}, model={self.model!r})"

    def complete(self, user_texts: list[str], sampling: Sampling, seeds: Optional[list[int]] = None) -> list[str]:
        seeds = seeds or [sampling.seed] * len(user_texts)
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return list(pool.map(lambda args: self._one(*args, sampling), zip(user_texts, seeds)))

    def _one(self, text: str, seed: Optional[int], sampling: Sampling) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
        }
        if seed is not None:
            body["seed"] = seed
        if sampling.top_k > 0:  # not in OpenAI's API; vLLM and most open servers accept it
            body["top_k"] = sampling.top_k
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                reply = json.load(response)
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:300]
            raise RuntimeError(f"extractor endpoint {self.url} answered {err.code}: {detail}") from None
        except urllib.error.URLError as err:
            raise RuntimeError(f"extractor endpoint {self.url} unreachable: {err.reason}") from None
        return reply["choices"][0]["message"]["content"] or ""
