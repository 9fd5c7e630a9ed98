# Minimal image for the API and the workers (CPU torch wheels). For the GPU worker build with
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
# and run it with the NVIDIA container runtime (docker compose --profile gpu).
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 MPLBACKEND=Agg
WORKDIR /app
RUN pip install --index-url ${TORCH_INDEX} torch==2.13.0
COPY . .
RUN pip install -e . && useradd --uid 10001 onp && mkdir -p /var/lib/onp/artifacts && chown -R onp /var/lib/onp
USER onp
EXPOSE 8000
CMD ["onp", "serve", "--host", "0.0.0.0", "--port", "8000"]
