#!/bin/sh
# Container entrypoint: secrets mounted by compose (/run/secrets/*) become the environment variables
# the pipeline reads, at run time only: nothing secret is ever part of an image layer.
set -eu
if [ -z "${HF_TOKEN:-}" ] && [ -s /run/secrets/hf_token ]; then
  HF_TOKEN="$(cat /run/secrets/hf_token)"; export HF_TOKEN
fi
if [ -z "${VLLM_API_KEY:-}" ] && [ -s /run/secrets/vllm_api_key ]; then
  VLLM_API_KEY="$(cat /run/secrets/vllm_api_key)"; export VLLM_API_KEY
fi
exec "$@"
