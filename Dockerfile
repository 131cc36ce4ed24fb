# docker build -t p3 .   then   docker run -p 127.0.0.1:54321:5440 p3
FROM python:3.11-slim

# The CPU-only torch index keeps the image small; a build without registry access can point elsewhere.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

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

COPY modelserver.proto .
RUN python3 -m grpc_tools.protoc -I=. --python_out=. --grpc_python_out=. modelserver.proto

COPY stubs.py serverproc.py server.py models.py client.py autograde.py ./
COPY deploy/docker/healthcheck.py ./
COPY workloads ./workloads
COPY examples ./examples

RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin modelserver
USER modelserver

EXPOSE 5440
HEALTHCHECK --interval=5s --start-period=30s --timeout=5s --retries=3 \
    CMD ["python3", "/app/healthcheck.py"]
# Absolute path: graders may bind-mount their own folder as the working directory.
CMD ["python3", "/app/server.py"]
