// The protocol session: one WebSocket to the Parley server at a time, with resume, acknowledgements,
// deduplication, gap repair, the outbox and reconnection. It touches no DOM, and the page listens to its events.
//
// Delivery rule: a "messages" event with source "live" is dispatched synchronously, and its listener must render
// the messages before returning. Only after that does the session acknowledge them and advance the stored
// position, so the server's cursor never passes a message that the person could not see.

import { Outbox } from "./outbox.js";
import { userKeys } from "./storage.js";

export const NAME_PATTERN = /^[A-Za-z0-9._:-]{1,64}$/;

const ACK_INTERVAL_MS = 100;
const READ_INTERVAL_MS = 250;
const RESEND_CHECK_MS = 1000;
const HISTORY_PAGE = 50;
const BACKOFF_BASE_MS = 500;
const BACKOFF_CAP_MS = 30000;
const STABLE_CONNECTION_MS = 10000;
const PONG_GRACE_MS = 10000;
const DEFAULT_HEARTBEAT_MS = 25000;
const DEFAULT_ACK_TIMEOUT_MS = 5000;
const DEFAULT_MAX_BODY = 4096;

/** Close codes after which reconnecting cannot help until the person signs in again. */
const SIGN_OUT_CLOSE_CODES = new Set([4001]);

/** Returns the delay before reconnect attempt `attempt` (0-based): full jitter over 0.5 s × 2^attempt, capped at 30 s. */
export function backoffDelay(attempt, random = Math.random) {
  const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** Math.min(attempt, 16));
  return Math.floor(random() * ceiling);
}

export function utf8Length(text) {
  return new TextEncoder().encode(text).length;
}

/** Returns null when `body` can be sent under `maxBody`, else the reason as an i18n key with its values. */
export function checkBody(body, maxBody) {
  if (body.includes("\u0000")) {
    return { key: "bodyInvalid", vars: {} };
  }
  const size = utf8Length(body);
  if (size > maxBody) {
    return { key: "bodyTooLarge", vars: { size, max: maxBody } };
  }
  return null;
}

class RoomState {
  constructor(name, saved = {}) {
    this.name = name;
    this.since = Number.isInteger(saved.since) ? saved.since : 0;
    this.epoch = typeof saved.epoch === "string" ? saved.epoch : null;
    this.read = Number.isInteger(saved.read) ? saved.read : 0;
    this.needsJoin = Boolean(saved.needsJoin);
    this.readUnsent = Boolean(saved.readUnsent);
    this.head = this.since;
    this.joined = false;
    this.rejoinPending = false;
    this.messages = new Map();
    this.lowest = Infinity;
    this.atStart = false;
    this.historyId = null;
    this.receipts = new Map();
    this.online = new Set();
    this.ackTimer = null;
    this.ackedSent = 0;
    this.readTimer = null;
    this.readSent = 0;
  }

  toSaved() {
    const saved = { since: this.since, epoch: this.epoch, read: this.read };
    if (this.needsJoin) {
      saved.needsJoin = true;
    }
    if (this.readUnsent) {
      saved.readUnsent = true;
    }
    return saved;
  }

  clearMessages() {
    this.messages.clear();
    this.lowest = Infinity;
    this.atStart = false;
    this.historyId = null;
  }

  // NOTE: loaded messages stay in memory for the life of the page, so a long session in a busy room keeps growing.
  hold(message) {
    this.messages.set(message.seq, message);
    this.lowest = Math.min(this.lowest, message.seq);
  }
}

function isMessageFrame(frame) {
  return (
    frame &&
    typeof frame.room === "string" &&
    Number.isInteger(frame.seq) &&
    frame.seq > 0 &&
    typeof frame.body === "string"
  );
}

export class Session extends EventTarget {
  /**
   * @param options.wsUrl absolute ws:// or wss:// URL of the server's /ws
   * @param options.storage a JsonStorage
   * @param options.WebSocketImpl the WebSocket constructor, replaceable by a fake
   * @param options.now clock returning milliseconds since the epoch
   * @param options.random source of numbers in [0, 1) for the backoff jitter
   * @param options.timers object with setTimeout and clearTimeout
   */
  constructor({ wsUrl, storage, WebSocketImpl = globalThis.WebSocket, now = () => Date.now(), random = Math.random, timers = globalThis }) {
    super();
    this.wsUrl = wsUrl;
    this.storage = storage;
    this.WebSocketImpl = WebSocketImpl;
    this.now = now;
    this.random = random;
    this.timers = timers;

    this.credentials = null;
    this.stopped = true;
    this.user = null;
    this.keys = null;
    this.rooms = new Map();
    this.outbox = null;
    this.limits = { heartbeat: DEFAULT_HEARTBEAT_MS, ackTimeout: DEFAULT_ACK_TIMEOUT_MS, maxBody: DEFAULT_MAX_BODY };

    this.ws = null;
    this.state = "signed-out";
    this.welcomed = false;
    this.attempt = 0;
    this.retryAt = null;
    this.retryTimer = null;
    this.stableTimer = null;
    this.resendTimer = null;
    this.livenessTimer = null;
    this.lastReceived = 0;
    this.pingSent = false;
    this.historyCounter = 0;
    this.counters = {
      connects: 0,
      welcomes: 0,
      framesIn: 0,
      framesOut: 0,
      messages: 0,
      duplicates: 0,
      gaps: 0,
      resets: 0,
      sends: 0,
      resends: 0,
      acks: 0,
      reads: 0,
    };
  }

  emit(type, detail = {}) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  setState(state) {
    this.state = state;
    this.emit("state", { state, retryAt: this.retryAt });
  }

  // ---- signing in and out ----

  /** Starts a session with `{user}` (open authentication) or `{token}`, remembering `user` once the server names it. */
  start(credentials) {
    this.stop();
    this.credentials = { user: credentials.user ?? null, token: credentials.token ?? null };
    this.stopped = false;
    this.attempt = 0;
    if (this.credentials.user) {
      this.loadUser(this.credentials.user);
    }
    this.connect();
  }

  /** Closes the connection and stops reconnecting. The user's positions and outbox stay in storage. */
  stop() {
    this.stopped = true;
    this.clearRetry();
    if (this.ws) {
      const ws = this.ws;
      this.detachSocket();
      ws.close(1000, "signed out");
    }
  }

  signOut(reason) {
    this.stop();
    const credentials = this.credentials;
    this.credentials = null;
    this.user = null;
    this.rooms = new Map();
    this.outbox = null;
    this.setState("signed-out");
    this.emit("signed-out", { reason, credentials });
  }

  loadUser(user) {
    for (const room of this.rooms.values()) {
      this.cancelRoomTimers(room);
    }
    this.user = user;
    const keys = userKeys(user);
    this.keys = keys;
    this.rooms = new Map();
    const saved = this.storage.get(keys.rooms, {});
    if (saved && typeof saved === "object") {
      for (const [name, position] of Object.entries(saved)) {
        if (NAME_PATTERN.test(name)) {
          this.rooms.set(name, new RoomState(name, position ?? {}));
        }
      }
    }
    this.outbox = new Outbox(this.storage, keys.outbox);
    this.emit("user", { user });
    this.emit("rooms");
  }

  saveRooms() {
    if (!this.keys) {
      return;
    }
    const saved = {};
    for (const room of this.rooms.values()) {
      saved[room.name] = room.toSaved();
    }
    this.storage.set(this.keys.rooms, saved);
  }

  // ---- connection lifecycle ----

  connect() {
    this.clearRetry();
    if (this.stopped || !this.credentials) {
      return;
    }
    let url = this.wsUrl;
    if (this.credentials.token) {
      url += (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(this.credentials.token);
    }
    this.counters.connects += 1;
    this.welcomed = false;
    this.setState("connecting");
    let ws;
    try {
      ws = new this.WebSocketImpl(url);
    } catch (error) {
      console.warn("parley: could not open WebSocket", error);
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    ws.onopen = () => this.sendHello();
    ws.onmessage = (event) => this.handleData(event.data);
    ws.onclose = (event) => this.handleClose(ws, event.code, event.reason);
    ws.onerror = () => {
      // The close event that follows every error decides what happens next.
    };
  }

  sendHello() {
    const hello = { type: "hello", device: "web", batch: true };
    if (this.credentials.token) {
      hello.token = this.credentials.token;
    } else {
      hello.user = this.credentials.user;
    }
    // Without a known user the stored positions could belong to someone else, so the server's cursors decide.
    if (this.user && (!this.credentials.token || this.credentials.user === this.user)) {
      const resume = {};
      for (const room of this.rooms.values()) {
        if (room.since > 0 || room.epoch) {
          resume[room.name] = room.epoch ? { since: room.since, epoch: room.epoch } : { since: room.since };
        }
      }
      hello.resume = resume;
    }
    this.lastReceived = this.now();
    this.sendFrame(hello);
  }

  detachSocket() {
    const ws = this.ws;
    if (ws) {
      ws.onopen = null;
      ws.onmessage = null;
      ws.onclose = null;
      ws.onerror = null;
    }
    this.ws = null;
    this.welcomed = false;
    for (const timer of ["stableTimer", "resendTimer", "livenessTimer"]) {
      if (this[timer] !== null) {
        this.timers.clearTimeout(this[timer]);
        this[timer] = null;
      }
    }
    for (const room of this.rooms.values()) {
      this.cancelRoomTimers(room);
      room.joined = false;
      room.rejoinPending = false;
      room.historyId = null;
      room.ackedSent = 0;
      room.readSent = 0;
      room.online.clear();
    }
    if (this.outbox) {
      this.outbox.resetConnection();
    }
    this.emit("presence", { room: null });
  }

  cancelRoomTimers(room) {
    if (room.ackTimer !== null) {
      this.timers.clearTimeout(room.ackTimer);
      room.ackTimer = null;
    }
    if (room.readTimer !== null) {
      this.timers.clearTimeout(room.readTimer);
      room.readTimer = null;
    }
  }

  handleClose(ws, code, reason) {
    if (ws !== this.ws) {
      return;
    }
    const wasWelcomed = this.welcomed;
    this.detachSocket();
    console.info("parley: connection closed", code, reason || "");
    if (SIGN_OUT_CLOSE_CODES.has(code)) {
      this.signOut(this.credentials && !this.credentials.token && !wasWelcomed ? "token-required" : "unauthorized");
      return;
    }
    if (!this.stopped) {
      this.scheduleReconnect();
    }
  }

  /** Drops a connection that may be dead (network gone, no pong) without waiting for the closing handshake. */
  abandon(reason) {
    if (!this.ws) {
      return;
    }
    console.info("parley: dropping connection:", reason);
    const ws = this.ws;
    this.detachSocket();
    try {
      ws.close(1000, reason);
    } catch {
      // The socket is already closed.
    }
    if (!this.stopped) {
      this.scheduleReconnect();
    }
  }

  scheduleReconnect() {
    this.clearRetry();
    const delay = backoffDelay(this.attempt, this.random);
    this.attempt += 1;
    this.retryAt = this.now() + delay;
    this.retryTimer = this.timers.setTimeout(() => {
      this.retryTimer = null;
      this.retryAt = null;
      this.connect();
    }, delay);
    this.setState("waiting");
  }

  clearRetry() {
    if (this.retryTimer !== null) {
      this.timers.clearTimeout(this.retryTimer);
    }
    this.retryTimer = null;
    this.retryAt = null;
  }

  /** Connects at once instead of waiting for the backoff timer, e.g. when the browser comes back online. */
  reconnectNow() {
    if (this.stopped || !this.credentials) {
      return;
    }
    if (this.state === "waiting") {
      this.attempt = 0;
      this.connect();
    }
  }

  handleOffline() {
    this.abandon("browser offline");
  }

  // ---- sending ----

  sendFrame(frame) {
    const ws = this.ws;
    if (!ws || ws.readyState !== 1) {
      return false;
    }
    ws.send(JSON.stringify(frame));
    this.counters.framesOut += 1;
    return true;
  }

  get connected() {
    return this.ws !== null && this.welcomed;
  }

  // ---- receiving ----

  handleData(data) {
    if (typeof data !== "string") {
      return;
    }
    this.lastReceived = this.now();
    this.pingSent = false;
    let parsed;
    try {
      parsed = JSON.parse(data);
    } catch {
      console.warn("parley: ignoring a message that is not JSON", data.slice(0, 200));
      return;
    }
    const frames = Array.isArray(parsed) ? parsed : [parsed];
    for (const frame of frames) {
      if (!frame || typeof frame !== "object" || typeof frame.type !== "string") {
        continue;
      }
      this.counters.framesIn += 1;
      try {
        this.handleFrame(frame);
      } catch (error) {
        console.error("parley: failed to handle frame", frame.type, error);
      }
    }
  }

  handleFrame(frame) {
    switch (frame.type) {
      case "welcome":
        return this.onWelcome(frame);
      case "joined":
        return this.onJoined(frame);
      case "msg":
        return this.onMessage(frame);
      case "sent":
        return this.onSent(frame);
      case "acked":
        return this.onAcked(frame);
      case "history":
        return this.onHistory(frame);
      case "receipt":
        return this.onReceipt(frame);
      case "presence":
        return this.onPresence(frame);
      case "left":
        return this.onLeft(frame);
      case "error":
        return this.onError(frame);
      case "pong":
        return undefined;
      default:
        return undefined;
    }
  }

  onWelcome(frame) {
    const user = typeof frame.user === "string" ? frame.user : this.credentials.user;
    if (user !== this.user) {
      this.loadUser(user);
    }
    if (this.credentials.user !== user) {
      this.credentials.user = user;
    }
    this.emit("credentials", { credentials: { ...this.credentials } });
    this.limits = {
      heartbeat: Number.isInteger(frame.heartbeat) && frame.heartbeat > 0 ? frame.heartbeat : DEFAULT_HEARTBEAT_MS,
      ackTimeout: Number.isInteger(frame.ack_timeout) && frame.ack_timeout > 0 ? frame.ack_timeout : DEFAULT_ACK_TIMEOUT_MS,
      maxBody: Number.isInteger(frame.max_body) && frame.max_body > 0 ? frame.max_body : DEFAULT_MAX_BODY,
    };
    this.welcomed = true;
    this.counters.welcomes += 1;
    this.stableTimer = this.timers.setTimeout(() => {
      this.stableTimer = null;
      this.attempt = 0;
    }, STABLE_CONNECTION_MS);
    this.setState("connected");

    for (const room of this.rooms.values()) {
      if (room.needsJoin) {
        this.sendJoin(room);
      }
    }
    this.flushOutbox();
    this.armResendTimer();
    this.armLivenessTimer();
  }

  onJoined(frame) {
    if (typeof frame.room !== "string" || !Number.isInteger(frame.since)) {
      return;
    }
    let room = this.rooms.get(frame.room);
    const isNew = !room;
    if (!room) {
      room = new RoomState(frame.room);
      this.rooms.set(frame.room, room);
    }

    const epochChanged = room.epoch !== null && typeof frame.epoch === "string" && frame.epoch !== room.epoch;
    if (frame.reset || epochChanged) {
      this.counters.resets += 1;
      this.startRoomOver(room, frame.since);
    } else if (frame.since > room.since) {
      // The server starts after the last message this page has, so the view starts again there.
      this.startRoomOver(room, frame.since);
    }
    if (typeof frame.epoch === "string") {
      room.epoch = frame.epoch;
    }
    if (Number.isInteger(frame.head)) {
      room.head = frame.head;
    }
    if (room.since === 0 && room.head === 0) {
      room.atStart = true;
    }
    // The server requests slower acks from members of a large room.
    room.ackIntervalMs = Number.isInteger(frame.ack_interval) && frame.ack_interval > ACK_INTERVAL_MS
      ? frame.ack_interval
      : ACK_INTERVAL_MS;
    room.joined = true;
    room.needsJoin = false;
    room.rejoinPending = false;
    if (Array.isArray(frame.online)) {
      room.online = new Set(frame.online.filter((user) => typeof user === "string"));
    }
    this.saveRooms();

    // Acks and read markers that could not be sent while disconnected go out now. The server ignores repeats.
    if (room.since > 0) {
      this.scheduleAck(room);
    }
    if (room.readUnsent) {
      this.scheduleRead(room);
    }
    this.flushOutbox();
    this.emit("rooms", { added: isNew ? room.name : null });
    this.emit("presence", { room: room.name });
  }

  /** Drops what the page has loaded of `room` and continues from position `since`. */
  startRoomOver(room, since) {
    room.clearMessages();
    room.since = since;
    room.read = Math.min(room.read, since);
    if (since > 0 && room.read === 0) {
      // A first join starts at the head, and the messages before it count as read.
      room.read = since;
    }
    room.receipts.clear();
    this.emit("room-reset", { room: room.name });
  }

  onMessage(frame) {
    if (!isMessageFrame(frame)) {
      return;
    }
    const room = this.rooms.get(frame.room);
    if (!room) {
      return;
    }
    if (frame.seq <= room.since || room.messages.has(frame.seq)) {
      this.counters.duplicates += 1;
      return;
    }
    if (frame.seq > room.since + 1) {
      // A correct server never skips a seq; asking again from our position refills whatever went missing.
      this.counters.gaps += 1;
      if (!room.rejoinPending) {
        room.rejoinPending = true;
        this.sendJoin(room);
      }
      return;
    }
    const message = this.toMessage(frame);
    room.since = frame.seq;
    room.head = Math.max(room.head, frame.seq);
    room.hold(message);
    this.counters.messages += 1;
    const confirmed = message.from === this.user ? this.outbox.confirm(room.name, message.id) : null;
    this.emit("messages", { room: room.name, messages: [message], source: "live", confirmed: confirmed ? [confirmed.id] : [] });
    this.scheduleAck(room);
    this.emit("rooms");
  }

  toMessage(frame) {
    return {
      room: frame.room,
      seq: frame.seq,
      id: typeof frame.id === "string" ? frame.id : "",
      from: typeof frame.from === "string" ? frame.from : "",
      ts: Number.isFinite(frame.ts) ? frame.ts : 0,
      body: frame.body,
      meta: frame.meta && typeof frame.meta === "object" ? frame.meta : null,
    };
  }

  onSent(frame) {
    if (typeof frame.room !== "string" || typeof frame.id !== "string" || !this.outbox) {
      return;
    }
    const entry = this.outbox.confirm(frame.room, frame.id);
    if (entry) {
      this.emit("outbox", { change: "stored", room: frame.room, id: frame.id, seq: frame.seq, ts: frame.ts });
    }
  }

  onHistory(frame) {
    const room = typeof frame.room === "string" ? this.rooms.get(frame.room) : null;
    if (!room || frame.id !== room.historyId) {
      return;
    }
    room.historyId = null;
    const added = [];
    const confirmed = [];
    for (const item of Array.isArray(frame.messages) ? frame.messages : []) {
      if (!isMessageFrame({ ...item, room: room.name }) || item.seq > room.since || room.messages.has(item.seq)) {
        continue;
      }
      const message = this.toMessage({ ...item, room: room.name });
      room.hold(message);
      added.push(message);
      if (message.from === this.user && this.outbox.confirm(room.name, message.id)) {
        confirmed.push(message.id);
      }
    }
    if (!frame.more || room.lowest <= 1) {
      room.atStart = true;
    }
    if (added.length > 0) {
      this.emit("messages", { room: room.name, messages: added, source: "history", confirmed });
    }
    this.emit("history-state", { room: room.name, loading: false, atStart: room.atStart });
  }

  onReceipt(frame) {
    const room = typeof frame.room === "string" ? this.rooms.get(frame.room) : null;
    if (!room || typeof frame.user !== "string") {
      return;
    }
    const previous = room.receipts.get(frame.user) ?? { delivered: 0, read: 0 };
    const receipt = {
      delivered: Math.max(previous.delivered, Number.isInteger(frame.delivered) ? frame.delivered : 0),
      read: Math.max(previous.read, Number.isInteger(frame.read) ? frame.read : 0),
    };
    room.receipts.set(frame.user, receipt);
    if (frame.user === this.user && receipt.read > room.read) {
      room.read = Math.min(receipt.read, room.since);
      this.saveRooms();
      this.emit("rooms");
    }
    this.emit("receipts", { room: room.name });
  }

  onPresence(frame) {
    const room = typeof frame.room === "string" ? this.rooms.get(frame.room) : null;
    if (!room || typeof frame.user !== "string") {
      return;
    }
    if (frame.online) {
      room.online.add(frame.user);
    } else {
      room.online.delete(frame.user);
    }
    this.emit("presence", { room: room.name });
    this.emit("receipts", { room: room.name });
  }

  onLeft(frame) {
    if (typeof frame.room !== "string") {
      return;
    }
    this.forgetRoom(frame.room);
    this.emit("left", { room: frame.room });
  }

  forgetRoom(name) {
    const room = this.rooms.get(name);
    if (room) {
      this.cancelRoomTimers(room);
      this.rooms.delete(name);
      this.saveRooms();
    }
    if (this.outbox) {
      this.outbox.dropRoom(name);
    }
    this.emit("rooms");
  }

  onError(frame) {
    const code = typeof frame.code === "string" ? frame.code : "internal";
    const ref = frame.ref && typeof frame.ref === "object" ? frame.ref : {};
    console.warn("parley: server error", code, frame.message ?? "", ref);
    if (code === "unauthorized") {
      this.signOut(this.credentials && !this.credentials.token && !this.welcomed ? "token-required" : "unauthorized");
      return;
    }
    if (ref.type === "send" && typeof ref.room === "string" && typeof ref.id === "string") {
      this.onSendError(code, ref, frame);
      return;
    }
    if (ref.type === "history" && typeof ref.room === "string") {
      const room = this.rooms.get(ref.room);
      if (room && room.historyId === ref.id) {
        room.historyId = null;
        this.emit("history-state", { room: room.name, loading: false, atStart: room.atStart, failed: true });
      }
    }
    if (ref.type === "join" && typeof ref.room === "string" && (code === "forbidden" || code === "invalid_field")) {
      this.forgetRoom(ref.room);
    }
    if ((ref.type === "ack" || ref.type === "read") && code === "not_joined") {
      return;
    }
    this.emit("server-error", { code, message: typeof frame.message === "string" ? frame.message : "", ref });
  }

  onSendError(code, ref, frame) {
    if (!this.outbox || !this.outbox.find(ref.room, ref.id)) {
      return;
    }
    if (code === "rate_limited") {
      const wait = Number.isFinite(frame.retry_after) ? frame.retry_after : 1000;
      this.outbox.delayRoom(ref.room, this.now() + wait);
      this.emit("outbox", { change: "delayed", room: ref.room, id: ref.id });
      return;
    }
    if (code === "overloaded" || code === "internal") {
      // Transient: the resend timer tries again with the same id.
      return;
    }
    if (code === "not_joined") {
      const room = this.rooms.get(ref.room);
      if (room) {
        room.needsJoin = true;
        this.saveRooms();
        this.sendJoin(room);
        return;
      }
    }
    const failure = { code, message: typeof frame.message === "string" ? frame.message : "" };
    this.outbox.fail(ref.room, ref.id, failure);
    this.emit("outbox", { change: "failed", room: ref.room, id: ref.id, failure });
  }

  // ---- acknowledgements and read markers ----

  /** Follows the server's hint: members of a large room acknowledge less often. */
  onAcked(frame) {
    const room = this.rooms.get(frame.room);
    if (room) {
      room.ackIntervalMs = Number.isInteger(frame.ack_interval) && frame.ack_interval > ACK_INTERVAL_MS
        ? frame.ack_interval
        : ACK_INTERVAL_MS;
    }
  }

  scheduleAck(room) {
    if (room.ackTimer !== null) {
      return;
    }
    room.ackTimer = this.timers.setTimeout(() => {
      room.ackTimer = null;
      this.saveRooms();
      if (room.since > room.ackedSent && this.sendFrame({ type: "ack", room: room.name, seq: room.since })) {
        room.ackedSent = room.since;
        this.counters.acks += 1;
      }
    }, room.ackIntervalMs || ACK_INTERVAL_MS);
  }

  /** Moves the read marker of `roomName` forward to `seq` once that message was on screen. */
  markRead(roomName, seq) {
    const room = this.rooms.get(roomName);
    if (!room || seq <= room.read || seq > room.since) {
      return;
    }
    room.read = seq;
    room.readUnsent = true;
    this.saveRooms();
    this.emit("rooms");
    this.scheduleRead(room);
  }

  scheduleRead(room) {
    if (room.readTimer !== null) {
      return;
    }
    room.readTimer = this.timers.setTimeout(() => {
      room.readTimer = null;
      if (room.read > room.readSent && room.joined && this.sendFrame({ type: "read", room: room.name, seq: room.read })) {
        room.readSent = room.read;
        room.readUnsent = false;
        this.counters.reads += 1;
      }
    }, READ_INTERVAL_MS);
  }

  // ---- rooms ----

  sendJoin(room) {
    const frame = { type: "join", room: room.name };
    if (room.epoch) {
      frame.since = room.since;
      frame.epoch = room.epoch;
    } else if (room.since > 0) {
      frame.since = room.since;
    }
    return this.sendFrame(frame);
  }

  /** Joins `name` now or on the next connection, and returns false for an invalid name. */
  join(name) {
    if (!NAME_PATTERN.test(name)) {
      return false;
    }
    let room = this.rooms.get(name);
    if (!room) {
      room = new RoomState(name, { needsJoin: true });
      this.rooms.set(name, room);
      this.saveRooms();
      this.emit("rooms", { added: name });
    }
    if (!room.joined && this.connected) {
      room.needsJoin = true;
      this.sendJoin(room);
    }
    return true;
  }

  leave(name) {
    const room = this.rooms.get(name);
    if (!room) {
      return false;
    }
    if (!room.joined && room.needsJoin) {
      // The server never heard of this membership, so there is nothing to end there.
      this.forgetRoom(name);
      this.emit("left", { room: name });
      return true;
    }
    return this.sendFrame({ type: "leave", room: name });
  }

  /** Requests the page of messages before the oldest one loaded, and returns false when it sends no request. */
  loadOlder(name) {
    const room = this.rooms.get(name);
    if (!room || !this.connected || !room.joined || room.historyId !== null || room.atStart) {
      return false;
    }
    const before = Number.isFinite(room.lowest) ? room.lowest : room.since + 1;
    if (before <= 1) {
      room.atStart = true;
      this.emit("history-state", { room: name, loading: false, atStart: true });
      return false;
    }
    this.historyCounter += 1;
    room.historyId = `h-${this.historyCounter}`;
    this.sendFrame({ type: "history", room: name, before, limit: HISTORY_PAGE, id: room.historyId });
    this.emit("history-state", { room: name, loading: true, atStart: false });
    return true;
  }

  // ---- the outbox ----

  /** Queues `body` for `roomName`, sends it when connected, and returns `{entry}` or `{error}`. */
  send(roomName, body) {
    if (!this.outbox || !this.rooms.has(roomName)) {
      return { error: { key: "error.not_joined", vars: {} } };
    }
    const problem = checkBody(body, this.limits.maxBody);
    if (problem) {
      return { error: problem };
    }
    const entry = this.outbox.add(roomName, body, this.now());
    this.emit("outbox", { change: "added", room: roomName, id: entry.id, entry });
    this.flushOutbox();
    return { entry };
  }

  retry(roomName, id) {
    if (this.outbox && this.outbox.retry(roomName, id)) {
      this.emit("outbox", { change: "retry", room: roomName, id });
      this.flushOutbox();
    }
  }

  discard(roomName, id) {
    if (this.outbox && this.outbox.discard(roomName, id)) {
      this.emit("outbox", { change: "removed", room: roomName, id });
    }
  }

  flushOutbox() {
    if (!this.connected || !this.outbox) {
      return;
    }
    const now = this.now();
    for (const entry of this.outbox.due(now, this.limits.ackTimeout)) {
      const room = this.rooms.get(entry.room);
      if (room && room.needsJoin && !room.joined) {
        continue;
      }
      if (this.sendFrame({ type: "send", room: entry.room, id: entry.id, body: entry.body })) {
        if (entry.attempts > 0) {
          this.counters.resends += 1;
        } else {
          this.counters.sends += 1;
        }
        this.outbox.markSent(entry, now);
      }
    }
  }

  armResendTimer() {
    this.resendTimer = this.timers.setTimeout(() => {
      this.resendTimer = null;
      if (!this.connected) {
        return;
      }
      this.flushOutbox();
      this.armResendTimer();
    }, RESEND_CHECK_MS);
  }

  /** Sends a ping after `heartbeat` ms of silence and drops the connection if nothing arrives soon after. */
  armLivenessTimer() {
    const interval = Math.min(5000, this.limits.heartbeat);
    this.livenessTimer = this.timers.setTimeout(() => {
      this.livenessTimer = null;
      if (!this.connected) {
        return;
      }
      const silence = this.now() - this.lastReceived;
      if (silence >= this.limits.heartbeat + PONG_GRACE_MS) {
        this.abandon("no answer to ping");
        return;
      }
      if (silence >= this.limits.heartbeat && !this.pingSent) {
        this.pingSent = this.sendFrame({ type: "ping" });
      }
      this.armLivenessTimer();
    }, interval);
  }

  // ---- derived state for the page ----

  roomNames() {
    return [...this.rooms.keys()].sort((a, b) => a.localeCompare(b));
  }

  /** Counts messages after the read marker, leaving out the user's own messages that this page has loaded. */
  unreadCount(name) {
    const room = this.rooms.get(name);
    if (!room) {
      return 0;
    }
    let own = 0;
    for (const message of room.messages.values()) {
      if (message.seq > room.read && message.from === this.user) {
        own += 1;
      }
    }
    return Math.max(0, room.since - room.read - own);
  }

  /**
   * Returns the status of the user's own message `seq`: "read" (with the readers) once another member read it,
   * "delivered" once every other online member's delivery cursor reached it, else "sent".
   */
  ownStatus(name, seq) {
    const room = this.rooms.get(name);
    if (!room) {
      return { kind: "sent", readers: [] };
    }
    const readers = [];
    for (const [user, receipt] of room.receipts) {
      if (user !== this.user && receipt.read >= seq) {
        readers.push(user);
      }
    }
    if (readers.length > 0) {
      return { kind: "read", readers };
    }
    const others = [...room.online].filter((user) => user !== this.user);
    const allDelivered = others.length > 0 && others.every((user) => (room.receipts.get(user)?.delivered ?? 0) >= seq);
    return { kind: allDelivered ? "delivered" : "sent", readers };
  }

  snapshot() {
    const rooms = {};
    for (const room of this.rooms.values()) {
      rooms[room.name] = {
        since: room.since,
        epoch: room.epoch,
        read: room.read,
        head: room.head,
        joined: room.joined,
        loaded: room.messages.size,
        online: [...room.online],
      };
    }
    return {
      state: this.state,
      user: this.user,
      attempt: this.attempt,
      retryAt: this.retryAt,
      counters: { ...this.counters },
      rooms,
      outbox: this.outbox ? this.outbox.entries.map((entry) => ({ room: entry.room, id: entry.id, failed: Boolean(entry.failure) })) : [],
    };
  }
}
