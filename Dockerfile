# medcad: one image for the API and the workers (the service never imports torch).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MEDCAD_DATA_DIR=/var/lib/medcad \
    MEDCAD_MODELS_DIR=/opt/medcad/models

RUN groupadd --system --gid 10001 medcad \
 && useradd --system --uid 10001 --gid medcad --home-dir /opt/medcad --shell /usr/sbin/nologin medcad \
 && mkdir -p /var/lib/medcad /opt/medcad \
 && chown medcad:medcad /var/lib/medcad

WORKDIR /opt/medcad
COPY pyproject.toml README.md ./
COPY app ./app
COPY workers ./workers
COPY migrations ./migrations
COPY models ./models
RUN pip install --no-cache-dir .

USER medcad
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=5 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"
CMD ["medcad", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker"]
