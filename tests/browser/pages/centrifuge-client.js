// The official centrifuge SDK (tests/js, loaded from /centrifuge.js) as an application page uses it: every
// event it gives the application goes to record() (harness.js), in order.
"use strict";

// Connect to `url`; with `user`, connection tokens come from the page server's /token, valid `tokenTtl` seconds.
window.startCentrifuge = (url, user, tokenTtl) => {
  const options = {minReconnectDelay: 100, maxReconnectDelay: 1000};
  if (user) {
    options.getToken = async () => {
      const response = await fetch(`/token?sub=${encodeURIComponent(user)}&ttl=${tokenTtl}`);
      const token = await response.text();
      record({type: "token", exp: JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/"))).exp});
      return token;
    };
  }
  const client = new Centrifuge(url, options);
  client.on("connecting", (ctx) => record({type: "connecting", code: ctx.code, reason: ctx.reason}));
  client.on("connected", (ctx) => record({type: "connected", client: ctx.client}));
  client.on("disconnected", (ctx) => record({type: "disconnected", code: ctx.code, reason: ctx.reason}));
  client.on("message", (ctx) => record({type: "message", data: ctx.data}));
  client.on("error", (ctx) => record({type: "error", kind: ctx.type, message: String(ctx.error && ctx.error.message)}));
  window.centrifuge = client;
  client.connect();
};

// A recoverable subscription: after a reconnect it asks for what it missed since its last offset and epoch.
window.subscribeChannel = (channel) => {
  const subscription = centrifuge.newSubscription(channel, {recoverable: true, positioned: true});
  subscription.on("subscribing", (ctx) => record({type: "subscribing", channel: channel, code: ctx.code}));
  subscription.on("subscribed", (ctx) => record({
    type: "subscribed", channel: channel, recoverable: ctx.recoverable, positioned: ctx.positioned,
    wasRecovering: ctx.wasRecovering, recovered: ctx.recovered, streamPosition: ctx.streamPosition || null,
  }));
  subscription.on("publication", (ctx) => record({
    type: "publication", channel: channel, data: ctx.data, offset: ctx.offset === undefined ? null : ctx.offset,
  }));
  subscription.on("unsubscribed", (ctx) => record({type: "unsubscribed", channel: channel, code: ctx.code}));
  subscription.on("error", (ctx) => record({type: "subscription error", channel: channel,
                                            message: String(ctx.error && ctx.error.message)}));
  subscription.subscribe();
};
