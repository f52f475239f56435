"""Call a running server with the KServe Python SDK (kserve.InferenceRESTClient), as a user would; print JSON.

    python tests/kserve_sdk_client.py BASE_URL MODEL TOKEN CLIP...

tests/test_clients.py runs it with an interpreter that has `kserve` installed (CONETTE_KSERVE_PYTHON): kserve
pins psutil<6, which conflicts with TorchServe's psutil==7.2.2, so it lives in a virtualenv of its own.
"""

import asyncio
import base64
import json
import sys
from pathlib import Path

import httpx
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def v2_answer(response) -> dict:
    outputs = {output.name: output.as_numpy().tolist() for output in response.outputs}
    return {"id": response.id, "caption": [c.decode() if isinstance(c, bytes) else c for c in outputs["caption"]],
            "score": outputs.get("score")}


async def main(base_url: str, model: str, token: str, paths: list[str]) -> dict:
    clips = [Path(path).read_bytes() for path in paths]
    headers = {"Authorization": f"Bearer {token}"}
    found = {}
    v1 = InferenceRESTClient(RESTConfig(protocol="v1"))
    answer = await v1.infer(base_url, {"instances": [{"audio": {"b64": b64(clip)}} for clip in clips]},
                            model_name=model, headers=dict(headers))
    found["v1"] = [prediction["caption"] for prediction in answer["predictions"]]

    v2 = InferenceRESTClient(RESTConfig(protocol="v2"))
    as_json = InferInput("audio", [len(clips)], "BYTES", data=[b64(clip) for clip in clips])
    answer = await v2.infer(base_url, InferRequest(model, [as_json], request_id="kserve-json",
                                                   parameters={"beam_size": 2}), model_name=model,
                            headers=dict(headers))
    found["v2_json"] = v2_answer(answer)

    as_binary = InferInput("audio", [len(clips)], "BYTES")
    as_binary.set_data_from_numpy(np.array(clips, dtype=np.object_), binary_data=True)
    response_headers: dict = {}
    request = InferRequest(model, [as_binary], request_id="kserve-binary", parameters={"beam_size": 2},
                           request_outputs=[RequestedOutput("caption", parameters={"binary_data": True}),
                                            RequestedOutput("score", parameters={"binary_data": True})])
    answer = await v2.infer(base_url, request, model_name=model, headers=dict(headers),
                            response_headers=response_headers)
    found["v2_binary"] = v2_answer(answer)
    found["v2_binary_header"] = response_headers.get("inference-header-content-length")

    try:
        await v2.infer(base_url, InferRequest(model, [as_json], parameters={"beam_size": 0}), model_name=model,
                       headers=dict(headers))
        found["v2_error"] = None
    except httpx.HTTPStatusError as error:
        found["v2_error"] = {"status": error.response.status_code, "body": error.response.json()}
    return found


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]))))
