"""Scale-out on Ray: batch generation over a Ray Data dataset, and the HTTP server as Ray Serve replicas.

    import ray
    import encdec_fast.ray

    ds = ray.data.read_json("inputs/")                     # rows like {"id": 7, "input": "a text"}
    out = encdec_fast.ray.generate_dataset(ds, "path/to/ckpt", num_actors=8, num_gpus=1, max_new_tokens=64)
    out.write_json("outputs/")                             # id, input, output_ids, text, num_generated, error

    app = encdec_fast.ray.serve_deployment("path/to/ckpt", num_replicas=4, num_gpus=1)
    ray.serve.run(app, route_prefix="/")                   # the same routes as `encdec-fast serve`

generate_dataset: one Engine per actor (each actor loads the model from the path itself), fed by an
async map_batches UDF, so that several batches of one actor are in the Engine at once and its decode
slots stay full (continuous batching across batches). Every input column is carried through, an id
column included: Ray does not keep row order. A row that fails (bad input, bad argument, an input
longer than the model) gets its message in the `error` column and nulls in the outputs; the other rows
of its batch, and the job, go on. Actors that ask for a GPU ask for a quarter of a CPU (the default
of one CPU per actor can leave no CPU for the read tasks and hang the job: ray issue #44687).

serve_deployment: server.create_app over an Engine in each replica, max_ongoing_requests raised to
twice the Engine's decode slots (Ray's default of 5 would starve continuous batching) and the
Serve-side queue bounded (max_queued_requests, then Ray answers 503).
"""

from __future__ import annotations

import asyncio

from .errors import InvalidInputError, MissingDependencyError

try:
    import ray  # noqa: F401  (the check that the extra is installed)
except ImportError as e:  # pragma: no cover  (the test extra installs it)
    raise MissingDependencyError(f"encdec_fast.ray needs Ray ({e}); install it with: pip install 'encdec_fast[ray]'") from None

OUTPUT_COLUMNS = ("output_ids", "text", "num_generated", "error")
GPU_ACTOR_CPUS = 0.25  # CPUs a GPU actor asks for (see the module docstring)


class _EngineActor:
    """A Ray Data actor: loads the model, owns one Engine, and generates for the batches it is given;
    async, so several batches share the Engine's decode slots."""

    def __init__(self, path, column: str, load_kwargs: dict, engine_kwargs: dict, generate_kwargs: dict):
        import encdec_fast

        model = encdec_fast.load(path, **load_kwargs)
        self.engine = encdec_fast.Engine(model, **engine_kwargs)
        self.column, self.kwargs = column, generate_kwargs

    async def __call__(self, batch):
        """batch: a pandas DataFrame; returns it with the output columns added."""
        if self.column not in batch:
            raise InvalidInputError(f"the dataset has no column {self.column!r} (it has {list(batch.columns)}); pass "
                                    "column=... naming the text or token-id column.")
        futures = [self.engine.submit(_plain(x), **self.kwargs) for x in batch[self.column]]
        results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)
        out = batch.copy()
        out["output_ids"] = [None if isinstance(r, BaseException) else r.output_ids for r in results]
        out["text"] = [None if isinstance(r, BaseException) else r.text for r in results]
        out["num_generated"] = [0 if isinstance(r, BaseException) else r.num_generated for r in results]
        out["error"] = [f"{type(r).__name__}: {r}" if isinstance(r, BaseException) else None for r in results]
        return out

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def _plain(x):
    """A dataset cell as an engine input: strings stay, array-likes of ids become lists, None stays
    None (the engine refuses it with a clear error)."""
    if x is None or isinstance(x, str):
        return x
    if hasattr(x, "tolist"):
        return x.tolist()
    return x


def generate_dataset(ds, path, *, column: str = "input", num_actors: int = 1, num_gpus: float = 0,
                     num_cpus: float | None = None, batch_size: int = 64, batches_in_flight: int = 4,
                     max_batch_size: int = 64, max_batch_tokens: int = 16384, max_input_tokens: int | None = None,
                     device=None, dtype=None, quantize=None, **generate_kwargs):
    """Generates for every row of a ray.data.Dataset; returns the dataset with the columns output_ids,
    text (for string inputs, else null), num_generated and error (null, or the row's error) added.

    column: the input column: strings (tokenised with the checkpoint folder's tokenizer) or lists of
    token ids. num_actors: Engines (actors), each loading the model from path (a folder every node can
    read). num_gpus/num_cpus: each actor's resources (num_cpus defaults to 1, or GPU_ACTOR_CPUS when it
    has a GPU). batch_size: rows per map_batches call; batches_in_flight: calls one actor serves at once.
    max_batch_size, max_batch_tokens, max_input_tokens: the Engine's. device, dtype, quantize: load()'s.
    generate_kwargs: model.generate's arguments (plus seed=), the same for every row. Lazy, like every
    Ray Data transformation: the work runs when the result is consumed or written."""
    for name, v in (("num_actors", num_actors), ("batch_size", batch_size), ("batches_in_flight", batches_in_flight)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InvalidInputError(f"{name} must be a positive int, got {v!r}.")
    schema = ds.schema(fetch_if_missing=False)  # known without running anything, or None
    names = list(schema.names) if schema is not None else None
    if names is not None:
        if column not in names:
            raise InvalidInputError(f"the dataset has no column {column!r} (it has {names}); pass column=... naming "
                                    "the text or token-id column.")
        clash = [c for c in OUTPUT_COLUMNS if c in names]
        if clash:
            raise InvalidInputError(f"the dataset already has the output column(s) {clash}; rename them first "
                                    "(ds.rename_columns) so that no input is overwritten.")
    if num_cpus is None:
        num_cpus = GPU_ACTOR_CPUS if num_gpus else 1
    load_kwargs = {"device": device, "dtype": dtype, "quantize": quantize}
    engine_kwargs = {"max_batch_size": max_batch_size, "max_batch_tokens": max_batch_tokens,
                     "max_input_tokens": max_input_tokens}
    return ds.map_batches(
        _EngineActor,
        batch_size=batch_size,
        batch_format="pandas",
        concurrency=num_actors,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        max_concurrency=batches_in_flight,
        fn_constructor_kwargs={"path": str(path), "column": column, "load_kwargs": load_kwargs,
                               "engine_kwargs": engine_kwargs, "generate_kwargs": generate_kwargs},
    )


def serve_deployment(path, *, num_replicas: int = 1, num_gpus: float = 0, num_cpus: float | None = None,
                     max_batch_size: int = 64, max_batch_tokens: int = 16384, max_ongoing_requests: int | None = None,
                     limits=None, device=None, dtype=None, name: str = "encdec_fast"):
    """A Ray Serve application serving the checkpoint at path with server.create_app in num_replicas
    replicas (give each num_gpus=1 to put one per GPU). Run it with ray.serve.run(app). Each replica
    loads the model, warms its Engine up, and only then takes requests.

    max_ongoing_requests: requests Ray sends one replica at once (default 2 x max_batch_size, so that
    waiting requests refill freed decode slots at once); limits: server.ServerLimits (its max_queued
    also bounds Ray's queue in front of the replicas)."""
    from ray import serve

    from .server import ServerLimits, create_app, warm_up

    limits = limits or ServerLimits()
    ongoing = max_ongoing_requests or 2 * max_batch_size
    path = str(path)

    def build_app():  # runs in each replica
        import encdec_fast

        model = encdec_fast.load(path, device=device, dtype=dtype)
        engine = encdec_fast.Engine(model, max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
                                    max_input_tokens=limits.max_input_tokens,
                                    max_request_tokens=limits.max_request_tokens)
        warm_up(engine)
        return create_app(engine, limits=limits, close_engine=True)

    if num_cpus is None:
        num_cpus = GPU_ACTOR_CPUS if num_gpus else 1
    deployment = serve.deployment(serve.ingress(build_app)(), name=name, num_replicas=num_replicas,
                                  max_ongoing_requests=ongoing, max_queued_requests=limits.max_queued,
                                  ray_actor_options={"num_gpus": num_gpus, "num_cpus": num_cpus})
    return deployment.bind()
