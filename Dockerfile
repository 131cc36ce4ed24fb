# docker build -t p3 .   then   docker run -p 127.0.0.1:54321:5440 p3
FROM python:3.11-slim

# The CPU-only torch index keeps the image small; a build without registry access can point elsewhere.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# PYTHONPATH=/app: the image's modules, and its sitecustomize (see deploy/docker/sitecustomize.py), reach
# every python3 in the container, whatever its working directory. No bytecode is written: graders
# bind-mount their own folder and should find in it only what their script writes.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONPATH=/app

WORKDIR /app

# Dependencies first, so editing the code does not reinstall torch.
COPY requirements.txt .
RUN pip install --index-url "$TORCH_INDEX_URL" "$(grep '^torch==' requirements.txt)"
RUN grep -v '^torch==' requirements.txt > /tmp/requirements-rest.txt \
 && pip install -r /tmp/requirements-rest.txt \
 && rm /tmp/requirements-rest.txt

COPY modelserver.proto inference.proto ./
RUN python3 -m grpc_tools.protoc -I=. --python_out=. --grpc_python_out=. modelserver.proto inference.proto

COPY stubs.py serverproc.py server.py models.py inference_server.py client.py autograde.py ./
COPY deploy/docker/entrypoint.py deploy/docker/healthcheck.py deploy/docker/sitecustomize.py ./
COPY workloads ./workloads
COPY examples ./examples

# The server runs as this user (entrypoint.py drops root for it). The image's default user stays root,
# so that `docker exec` can write into a bind-mounted folder whoever owns it on the host; sitecustomize
# then makes such a process the folder's owner.
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin modelserver

EXPOSE 5440
# Prometheus metrics are off unless asked for: docker run -p 127.0.0.1:9100:9100 p3 --metrics-port 9100
# The probe reads the server's own flags, so it follows --port, --host and TLS (deploy/docker/healthcheck.py).
HEALTHCHECK --interval=5s --start-period=30s --timeout=5s --retries=3 \
    CMD ["python3", "/app/healthcheck.py"]
# Arguments that start with '-' are flags for the server (`docker run p3 --model /models/m.pt`);
# any other command runs as given. Absolute paths: graders may make their own folder the working directory.
ENTRYPOINT ["python3", "-I", "/app/entrypoint.py"]
CMD ["python3", "/app/server.py"]
