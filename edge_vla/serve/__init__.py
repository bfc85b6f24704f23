"""`edge-vla serve`: answer openpi's websocket policy protocol from an edge-vla bundle.

A robot that already runs openpi's thin client (`openpi_client.WebsocketClientPolicy`) asks this
server for action chunks unchanged. Modules, one job each:

    codec      msgpack-numpy as openpi-client 0.1.2 packs it, decoded with size and dtype limits, and a
               walk of the raw bytes that bounds values and depth in all before anything is decoded
    obs_map    the client's observation keys (ALOHA / LIBERO / DROID presets or an explicit map) ->
               an edge-vla Observation (camera order, CHW/HWC, resize, state fit, instruction)
    server     the asyncio websocket server: metadata on connect, one Policy serving requests in
               order, per-connection seeds, API key, /healthz, per-request timing
    cli        `edge-vla serve BUNDLE ...`

Needs the `serve` extra (websockets, msgpack): pip install 'edge-vla[serve]'.
"""
