# memsvc service image (CPU): exactly the versions of requirements.lock (torch's CPU build from PyTorch's index).
# For CUDA, install torch==2.13.0+cu128 from https://download.pytorch.org/whl/cu128 after the lock.
FROM python:3.11-slim
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 MEMSVC_HOME=/var/lib/memsvc/home
WORKDIR /app
COPY pyproject.toml README.md requirements.lock ./
COPY memsvc memsvc
COPY store store
COPY kernels kernels
COPY proto proto
COPY clients clients
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.lock \
 && pip install --no-cache-dir --no-deps --no-build-isolation . \
 && memsvc model pull
VOLUME ["/var/lib/memsvc"]
# Binding 0.0.0.0 turns API keys on: the server refuses to start without them.
# Mount a keys file (TENANT=sha256:<hex> lines, made by `memsvc keys new`) here,
# or set MEMSVC_API_KEYS.
ENV MEMSVC_API_KEYS_FILE=/run/secrets/memsvc_api_keys
EXPOSE 50051 9464
CMD ["memsvc", "serve", "--host", "0.0.0.0", "--port", "50051", "--data-dir", "/var/lib/memsvc/data", \
     "--metrics-port", "9464"]
