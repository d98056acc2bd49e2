# Local stand-in for the public `registry:2` image: same port, config path and storage path.
FROM runner-compose/services:local
COPY registry-config.yml /etc/docker/registry/config.yml
RUN mkdir -p /var/lib/registry && chown docker-registry: /var/lib/registry
USER docker-registry
EXPOSE 5000
CMD ["docker-registry", "serve", "/etc/docker/registry/config.yml"]
