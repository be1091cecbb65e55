# One image for the gateway's API and its worker: `docker run IMAGE api`, `docker run IMAGE worker`
# (also `migrate`, `health`, `simulate-comfyui`). docker-compose.yml builds it for its services.
FROM python:3.11.15-slim AS build
WORKDIR /src
# Only what the package is built from: the tests and their extras stay out of the image.
COPY pyproject.toml README.md ./
COPY app app
COPY api api
COPY activities activities
COPY worker worker
COPY workflows_temporal workflows_temporal
COPY templates templates
COPY comfyui_gateway_client comfyui_gateway_client
# A virtual environment to copy whole into the runtime stage; pip compiles every module's bytecode as it
# installs, which the worker's workflow sandbox then reads instead of compiling per job (worker/bytecode.py).
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check .

FROM python:3.11.15-slim
RUN useradd --system --uid 10001 --user-group --home-dir /data --no-create-home gateway \
 && install -d -o gateway -g gateway /data
COPY --from=build /opt/venv /opt/venv
# HOST: inside a container the API must listen on every interface to be reached at all.
# DATA_DIR: the gateway's scratch files (and its SQLite database, when DATABASE_URL is unset).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    DATA_DIR=/data
USER gateway
WORKDIR /data
EXPOSE 3000
ENTRYPOINT ["comfyui-gateway"]
CMD ["api"]
