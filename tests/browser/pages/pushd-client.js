// A browser client of pushd's own protocol (docs/protocol.md), as an application page would write one: it
// connects again after the connection closes, and subscribes again to its topics, each from the last position
// it saw ("since"), so it gets exactly what it missed. Everything it sees goes to record() (harness.js).
"use strict";

class PushdClient {
  constructor(url) {
    this.url = url;
    this.topics = [];
    this.positions = {};  // topic -> {offset, epoch} of the last message with a position
    this.held = false;    // true: stay closed after a close, until resume()
    this.stopped = false;
    this.ws = null;
  }

  connect() {
    const ws = new WebSocket(this.url);
    this.ws = ws;
    ws.onopen = () => {
      record({type: "open"});
      if (this.topics.length) {
        const since = {};
        for (const topic of this.topics) {
          if (this.positions[topic]) {
            since[topic] = this.positions[topic];
          }
        }
        this.send({op: "subscribe", topics: this.topics, since: since, id: "resubscribe"});
      }
    };
    ws.onmessage = (event) => {
      const frame = JSON.parse(event.data);
      if (frame.topic !== undefined && frame.offset) {
        this.positions[frame.topic] = {offset: frame.offset, epoch: frame.epoch};
      }
      record({type: "frame", frame: frame});
    };
    ws.onclose = (event) => {
      record({type: "close", code: event.code, reason: event.reason, clean: event.wasClean});
      // 4001-4003: the token was refused or is missing; connecting again with it would be refused again.
      const tokenRefused = event.code >= 4001 && event.code <= 4003;
      if (!this.held && !this.stopped && !tokenRefused) {
        setTimeout(() => this.connect(), 100);
      }
    };
  }

  subscribe(topics, options) {
    this.topics.push(...topics);
    this.send({op: "subscribe", topics: topics, ...options});
  }

  send(frame) {
    this.ws.send(JSON.stringify(frame));
  }

  // Stay closed after the next close (the test publishes what the client is to miss meanwhile).
  hold() {
    this.held = true;
  }

  resume() {
    this.held = false;
    this.connect();
  }

  stop() {
    this.stopped = true;
    this.ws.close(1000, "done");
  }
}

window.PushdClient = PushdClient;
