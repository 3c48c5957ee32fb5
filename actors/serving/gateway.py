"""The gateway: a stateless Serve deployment serving two APIs side by side, composed here from
  - actors/serving/grpc_servicer.py: `mixtral_ep.v1.Generator` and `grpc.health.v1.Health`
    behind Serve's gRPC proxy (method names are the RPC names);
  - actors/serving/http_app.py: the OpenAI-compatible API and /health, a FastAPI ingress
    behind Serve's HTTP proxy (the routes are declared below, their bodies are there);
  - actors/serving/engine_client.py: the engine deployment's handle, the tokenizer and the
    model's name, which both use: requests are validated in one place
    (actors/serving/validation.py), tokenized here (prompt or chat template), and their token
    ids streamed from the engine deployment (detokenized there), with failover;
  - actors/serving/status.py: an exception's gRPC status, HTTP status and log line.

What it logs: a request that succeeds writes no line of its own. Serve's proxy writes its one
access line ("POST /v1/completions 200 41.2ms", "/mixtral_ep.v1.Generator/GenerateStream
mixtral-ep OK 138.5ms"): that is the request's line at INFO, as in a production server's access
log (vLLM's own per-request line is INFO only behind a flag). The replica access log, a second
line per request, is off here (`enable_access_log=False`), and so is the engine deployment's,
a line per handle call ("CALL stream OK"). A failed request adds one
line in its protocol's words: INFO for a client's error, ERROR for an internal one
(actors/serving/status.py).
"""
# no `from __future__ import annotations`: a route's annotations must be objects, not strings.
# Serve pickles this class by value, and a copied method's globals hold only the names its code
# uses, so the replica could not resolve "oai.CompletionRequest" (the body became a query
# parameter: every POST answered 400 "query.request: Field required").
from ray import serve
from ray.serve.schema import LoggingConfig

from actors.serving import auth, draining, http_app
from actors.serving import openai_api as oai
from actors.serving.engine_client import EngineClient
from actors.serving.grpc_servicer import GeneratorServicer
from actors.serving.http_app import openai_app
from model.tokenizer import Tokenizer


@serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0.1},
                  logging_config=LoggingConfig(enable_access_log=False),
                  graceful_shutdown_timeout_s=draining.GRACE_S,
                  graceful_shutdown_wait_loop_s=draining.WAIT_LOOP_S)
@serve.ingress(openai_app)
class Gateway(GeneratorServicer):
    def __init__(self, engine, tokenizer_path: str | None, model_name: str,
                 failover_timeout_s: float = 120.0, api_key_digest: str | None = None):
        """`engine`: DeploymentHandle of actors.serving.engine_server.EngineServer;
        `tokenizer_path`: a tokenizer directory (None: the demo's); `model_name`: what clients
        name in requests; `failover_timeout_s`: how long a request whose engine replica died
        waits for another; `api_key_digest`: SHA-256 hex digest of the API key every call must
        carry (actors/serving/auth.py), None for none."""
        self.engine = EngineClient(engine, Tokenizer.from_pretrained(tokenizer_path), model_name,
                                   failover_timeout_s)
        self.api_key_digest = api_key_digest
        auth.require(api_key_digest)                        # for the HTTP middleware
        self.drain = self.engine.drain                      # begun when Serve stops this replica
        draining.install()

    # ---- HTTP routes (actors/serving/http_app.py): declared on this class, see its docstring --
    # GET and HEAD as two routes: one route with both methods gives both one OpenAPI operation
    # id, and FastAPI warns of the duplicate
    @openai_app.get("/health")
    @openai_app.head("/health")
    async def health(self):
        return await http_app.health(self.engine)

    @openai_app.get("/v1/models")
    async def models(self):
        return await http_app.models(self.engine)

    @openai_app.get("/v1/models/{model:path}")
    async def model(self, model: str):
        return await http_app.model(self.engine, model)

    @openai_app.post("/v1/completions")
    async def completions(self, request: oai.CompletionRequest):
        return await http_app.completion(self.engine, request, chat=False)

    @openai_app.post("/v1/chat/completions")
    async def chat_completions(self, request: oai.ChatCompletionRequest):
        return await http_app.completion(self.engine, request, chat=True)
