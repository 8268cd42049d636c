// The page: sign-in, room list, message views and composer, wired to one protocol Session.

import {
  LANGUAGES,
  dayKey,
  detectLanguage,
  formatDay,
  formatFullDate,
  formatTime,
  getLanguage,
  hasKey,
  setLanguage,
  t,
  translateDocument,
} from "./i18n.js";
import { el, renderBody } from "./render.js";
import { NAME_PATTERN, Session } from "./session.js";
import { CREDENTIALS_KEY, JsonStorage } from "./storage.js";

const BOTTOM_SLACK_PX = 48;
const HISTORY_TRIGGER_PX = 200;
const ANNOUNCE_MAX_CHARS = 140;
const COUNTS_DELAY_MS = 1500;

const storage = new JsonStorage();
const $ = (id) => document.getElementById(id);

const wsUrl = new URL("ws", location.href);
wsUrl.protocol = location.protocol === "https:" ? "wss:" : "ws:";
wsUrl.search = "";
wsUrl.hash = "";

const session = new Session({ wsUrl: wsUrl.href, storage });

const ui = {
  activeRoom: null,
  views: new Map(),
  roomItems: new Map(),
  visibleSeqs: new Set(),
  countdownTimer: null,
  statusFrame: new Set(),
  countsTimers: new Map(),
  counts: new Map(),
};

// ---- language ----

function applyLanguage(code, remember) {
  const language = setLanguage(code, remember ? storage : null);
  document.documentElement.lang = language;
  translateDocument(document);
  $("language").value = language;
  renderConnection();
  renderMe();
  renderRoomList();
  renderRoomHeader();
  renderHistoryState();
  for (const view of ui.views.values()) {
    refreshViewTexts(view);
  }
}

function setUpLanguageSelect() {
  const select = $("language");
  for (const { code, label } of LANGUAGES) {
    select.append(el("option", { value: code, text: label, lang: code }));
  }
  select.addEventListener("change", () => applyLanguage(select.value, true));
}

// ---- sign-in ----

function showSignIn(messageKey) {
  $("chat").hidden = true;
  $("sign-in").hidden = false;
  $("sign-out").hidden = true;
  $("me").hidden = true;
  const error = $("sign-in-error");
  error.textContent = messageKey ? t(messageKey) : "";
  error.dataset.key = messageKey ?? "";
  if (messageKey === "invalidUserName") {
    $("sign-in-user").setAttribute("aria-invalid", "true");
  } else {
    $("sign-in-user").removeAttribute("aria-invalid");
  }
  if (messageKey === "tokenRequired") {
    $("token-details").open = true;
    $("sign-in-token").focus();
  } else {
    $("sign-in-user").focus();
  }
}

function showChat() {
  $("sign-in").hidden = true;
  $("chat").hidden = false;
  $("sign-out").hidden = false;
}

function onSignInSubmit(event) {
  event.preventDefault();
  const user = $("sign-in-user").value.trim();
  const token = $("sign-in-token").value.trim();
  let credentials;
  if (token) {
    credentials = { token, user: null };
  } else if (NAME_PATTERN.test(user)) {
    credentials = { user, token: null };
  } else {
    showSignIn(user ? "invalidUserName" : "missingCredentials");
    return;
  }
  $("sign-in-token").value = "";
  storage.set(CREDENTIALS_KEY, credentials);
  startSession(credentials);
}

function startSession(credentials) {
  resetViews();
  showChat();
  session.start(credentials);
}

function renderMe() {
  const me = $("me");
  me.textContent = session.user ? session.user : "";
  me.title = session.user ? t("signedInAs", { user: session.user }) : "";
  me.hidden = !session.user || $("chat").hidden;
}

// ---- connection state ----

function renderConnection() {
  const box = $("connection");
  const text = $("connection-text");
  const state = session.state;
  const offline = navigator.onLine === false;
  box.dataset.state = state === "waiting" && offline ? "offline" : state;
  let label;
  let announced;
  if (state === "connected") {
    label = t("connConnected");
  } else if (state === "connecting") {
    label = t("connConnecting");
  } else if (state === "waiting") {
    const seconds = Math.max(0, Math.ceil(((session.retryAt ?? Date.now()) - Date.now()) / 1000));
    label = t(offline ? "connOffline" : "connReconnecting", { seconds });
    announced = t(offline ? "connOfflineShort" : "connReconnectingShort");
  } else {
    label = t("connSignedOut");
  }
  text.textContent = label;
  // The live region gets the state without the countdown, so a screen reader does not read out every second.
  const announcedText = announced ?? label;
  if ($("connection-announced").textContent !== announcedText) {
    $("connection-announced").textContent = announcedText;
  }
  $("reconnect-now").hidden = state !== "waiting";
  updateRoomControls();

  if (state === "waiting" && ui.countdownTimer === null) {
    ui.countdownTimer = setInterval(renderConnection, 1000);
  } else if (state !== "waiting" && ui.countdownTimer !== null) {
    clearInterval(ui.countdownTimer);
    ui.countdownTimer = null;
  }
}

// ---- room list ----

/** Updates the room list in place, so that a focused room button survives new messages arriving. */
function renderRoomList() {
  const list = $("room-list");
  const names = session.roomNames();
  const listed = new Set(names);
  for (const [name, item] of ui.roomItems) {
    if (!listed.has(name)) {
      item.remove();
      ui.roomItems.delete(name);
    }
  }
  let previous = null;
  for (const name of names) {
    let item = ui.roomItems.get(name);
    if (!item) {
      const button = el("button", { type: "button", className: "room-button", dataset: { room: name } }, [
        el("span", { className: "room-name", text: name }),
        el("span", { className: "badge", hidden: true, attrs: { "aria-hidden": "true" } }),
        el("span", { className: "sr-only unread-label" }),
      ]);
      item = el("li", {}, [button]);
      ui.roomItems.set(name, item);
    }
    const expectedPosition = previous ? previous.nextElementSibling : list.firstElementChild;
    if (expectedPosition !== item) {
      list.insertBefore(item, expectedPosition);
    }
    updateRoomItem(item.firstElementChild, name);
    previous = item;
  }
  $("no-rooms").hidden = names.length > 0;
  const unread = names.reduce((total, name) => total + session.unreadCount(name), 0);
  document.title = unread > 0 ? `(${unread}) ${t("appName")}` : t("appName");
}

function updateRoomItem(button, name) {
  const unread = session.unreadCount(name);
  const badge = button.querySelector(".badge");
  const label = unread > 0 ? t("unreadCount", { count: unread }) : "";
  badge.hidden = unread === 0;
  badge.textContent = unread > 99 ? "99+" : String(unread);
  button.querySelector(".unread-label").textContent = label;
  if (name === ui.activeRoom) {
    button.setAttribute("aria-current", "true");
  } else {
    button.removeAttribute("aria-current");
  }
}

function onRoomListClick(event) {
  const button = event.target.closest("button[data-room]");
  if (button) {
    selectRoom(button.dataset.room);
    focusComposerIfListHidden();
  }
}

/** Moves focus to the composer when a narrow screen just hid the room list, which held the focus. */
function focusComposerIfListHidden() {
  if (getComputedStyle($("sidebar")).display === "none") {
    $("composer-input").focus();
  }
}

function onJoinSubmit(event) {
  event.preventDefault();
  const input = $("join-input");
  const name = input.value.trim();
  const error = $("join-error");
  if (!NAME_PATTERN.test(name)) {
    error.textContent = t("invalidRoomName");
    input.setAttribute("aria-invalid", "true");
    return;
  }
  error.textContent = "";
  input.removeAttribute("aria-invalid");
  session.join(name);
  input.value = "";
  selectRoom(name);
  focusComposerIfListHidden();
}

// ---- the open room ----

function activeKey() {
  return session.user ? `parley.user.${session.user}.active` : null;
}

function selectRoom(name) {
  if (name !== null && !session.rooms.has(name)) {
    name = null;
  }
  const scroller = $("scroller");
  const previous = ui.activeRoom ? ui.views.get(ui.activeRoom) : null;
  if (previous) {
    previous.scrollTop = scroller.scrollTop;
    previous.atBottom = isAtBottom();
  }

  ui.activeRoom = name;
  if (activeKey()) {
    storage.set(activeKey(), name);
  }
  document.body.dataset.view = name ? "room" : "rooms";
  renderRoomList();
  renderRoomHeader();
  renderHistoryState();
  updateRoomControls();

  readObserver.disconnect();
  ui.visibleSeqs.clear();
  const lists = $("message-lists");
  if (!name) {
    lists.replaceChildren();
    return;
  }
  const view = getView(name);
  lists.replaceChildren(view.list);
  for (const item of view.bySeq.values()) {
    readObserver.observe(item);
  }
  if (view.atBottom) {
    scrollToBottom();
  } else {
    scroller.scrollTop = view.scrollTop;
  }
  fillActiveView();
  scheduleCounts(name);
}

function renderRoomHeader() {
  const name = ui.activeRoom;
  $("room-title").textContent = name ?? "";
  $("no-room").hidden = Boolean(name);
  $("scroller").hidden = !name;
  $("online").hidden = !name;
  $("leave-room").hidden = !name;
  if (name) {
    $("scroller").setAttribute("aria-label", t("messages", { room: name }));
  }
  renderOnline();
}

function renderOnline() {
  const name = ui.activeRoom;
  const room = name ? session.rooms.get(name) : null;
  if (!room) {
    return;
  }
  const users = new Set(room.online);
  if (session.connected && session.user) {
    users.add(session.user);
  }
  const others = [...users].filter((user) => user !== session.user).sort((a, b) => a.localeCompare(b));
  $("online-summary").textContent = t("onlineCount", { count: users.size });
  const items = others.map((user) => el("li", { text: user }));
  if (users.has(session.user)) {
    items.unshift(el("li", { className: "self", text: `${session.user} (${t("you")})` }));
  }
  if (others.length === 0) {
    items.push(el("li", { className: "hint", text: t("onlineNobody") }));
  }
  $("online-list").replaceChildren(...items);
}

function updateRoomControls() {
  const name = ui.activeRoom;
  const room = name ? session.rooms.get(name) : null;
  const composerInput = $("composer-input");
  composerInput.disabled = !room;
  $("send").disabled = !room;
  const canLeave = Boolean(room) && (session.connected || (room.needsJoin && !room.joined));
  $("leave-room").disabled = !canLeave;
}

function renderHistoryState() {
  const box = $("history-state");
  const name = ui.activeRoom;
  const room = name ? session.rooms.get(name) : null;
  if (!room) {
    box.replaceChildren();
    return;
  }
  if (room.atStart) {
    box.replaceChildren(t("beginningOfRoom"));
  } else if (room.historyId !== null) {
    box.replaceChildren(t("loadingOlder"));
  } else {
    const button = el("button", { type: "button", className: "link-button", text: t("loadOlder") });
    button.addEventListener("click", () => session.loadOlder(name));
    box.replaceChildren(button);
  }
}

function isAtBottom() {
  const scroller = $("scroller");
  return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < BOTTOM_SLACK_PX;
}

function scrollToBottom() {
  const scroller = $("scroller");
  scroller.scrollTop = scroller.scrollHeight;
}

/** Requests older history while the open room's messages do not fill the screen or the reader is near the top. */
function fillActiveView() {
  const name = ui.activeRoom;
  if (!name) {
    return;
  }
  const scroller = $("scroller");
  const short = scroller.scrollHeight <= scroller.clientHeight + HISTORY_TRIGGER_PX;
  if (short || scroller.scrollTop < HISTORY_TRIGGER_PX) {
    if (session.loadOlder(name)) {
      renderHistoryState();
    }
  }
}

// ---- message views ----

function getView(name) {
  let view = ui.views.get(name);
  if (!view) {
    view = {
      room: name,
      list: el("ol", { className: "messages" }),
      bySeq: new Map(),
      seqs: [],
      pending: new Map(),
      scrollTop: 0,
      atBottom: true,
    };
    ui.views.set(name, view);
    for (const entry of session.outbox ? session.outbox.forRoom(name) : []) {
      addPending(view, entry);
    }
  }
  return view;
}

function resetViews() {
  readObserver.disconnect();
  ui.views.clear();
  ui.visibleSeqs.clear();
  ui.counts.clear();
  $("message-lists").replaceChildren();
}

function lowerBound(sorted, value) {
  let low = 0;
  let high = sorted.length;
  while (low < high) {
    const middle = (low + high) >> 1;
    if (sorted[middle] < value) {
      low = middle + 1;
    } else {
      high = middle;
    }
  }
  return low;
}

function buildMessageItem({ from, ts, body, own }) {
  const time = el("time", { dateTime: new Date(ts).toISOString(), text: formatTime(ts), title: formatFullDate(ts) });
  const header = el("div", { className: "message-meta" }, [el("span", { className: "sender", text: from }), " ", time]);
  const bodyBox = el("div", { className: "body" }, [renderBody(body)]);
  const bubble = el("div", { className: "bubble" }, [header, bodyBox]);
  const day = el("div", { className: "day", hidden: true });
  const item = el("li", { className: own ? "message own" : "message", dataset: { ts: String(ts) } }, [day, bubble]);
  if (own) {
    bubble.append(el("div", { className: "status" }));
  }
  return item;
}

function renderMessage(message) {
  const own = message.from === session.user;
  const item = buildMessageItem({ from: message.from, ts: message.ts, body: message.body, own });
  item.dataset.seq = String(message.seq);
  item.dataset.id = message.id;
  if (own) {
    renderOwnStatus(message.room, item);
  }
  return item;
}

function insertMessage(view, message) {
  const index = lowerBound(view.seqs, message.seq);
  if (view.seqs[index] === message.seq) {
    return null;
  }
  const item = renderMessage(message);
  const nextSeq = view.seqs[index];
  const before = nextSeq !== undefined ? view.bySeq.get(nextSeq) : firstPending(view);
  view.list.insertBefore(item, before ?? null);
  view.seqs.splice(index, 0, message.seq);
  view.bySeq.set(message.seq, item);
  if (message.from === session.user) {
    removePending(view, message.id);
  }
  refreshDay(item);
  if (item.nextElementSibling) {
    refreshDay(item.nextElementSibling);
  }
  if (view.room === ui.activeRoom) {
    readObserver.observe(item);
  }
  return item;
}

function firstPending(view) {
  for (const item of view.pending.values()) {
    return item;
  }
  return null;
}

/**
 * Shows the day above a message when it starts a new local day, or starts the list.
 * NOTE: labels are computed when a message is inserted, so "Today" stays on an open page after midnight.
 */
function refreshDay(item) {
  const ts = Number(item.dataset.ts);
  const previous = item.previousElementSibling;
  const day = item.querySelector(".day");
  const sameDay = previous && dayKey(Number(previous.dataset.ts)) === dayKey(ts);
  day.hidden = Boolean(sameDay);
  if (!sameDay) {
    day.textContent = formatDay(ts);
  }
}

function refreshViewTexts(view) {
  for (const item of view.list.children) {
    const ts = Number(item.dataset.ts);
    const time = item.querySelector("time");
    time.textContent = formatTime(ts);
    time.title = formatFullDate(ts);
    refreshDay(item);
    if (item.classList.contains("own")) {
      if (item.dataset.seq) {
        renderOwnStatus(view.room, item);
      } else {
        renderPendingStatus(view, item);
      }
    }
  }
}

function clearSequenced(view) {
  for (const item of view.bySeq.values()) {
    readObserver.unobserve(item);
    item.remove();
  }
  view.bySeq.clear();
  view.seqs = [];
  for (const item of view.pending.values()) {
    refreshDay(item);
  }
}

function onMessages({ room, messages, source }) {
  const view = getView(room);
  const active = room === ui.activeRoom;
  const scroller = $("scroller");
  const wasAtBottom = active && isAtBottom();
  const heightBefore = scroller.scrollHeight;
  const topBefore = scroller.scrollTop;
  const inserted = [];
  for (const message of messages) {
    if (insertMessage(view, message)) {
      inserted.push(message);
    }
  }
  if (active) {
    if (source === "history" && !wasAtBottom) {
      scroller.scrollTop = topBefore + (scroller.scrollHeight - heightBefore);
    } else if (wasAtBottom || (source === "live" && messages.some((message) => message.from === session.user))) {
      scrollToBottom();
    }
  } else if (source === "history") {
    view.atBottom = true;
  }
  if (source === "live") {
    announce(inserted.filter((message) => message.from !== session.user && active));
    for (const message of inserted) {
      if (message.from === session.user) {
        scheduleCounts(room);
      }
    }
  }
}

function announce(messages) {
  if (messages.length === 0) {
    return;
  }
  const region = $("announcer");
  for (const message of messages) {
    let body = message.body.replace(/\s+/g, " ").trim();
    if (body.length > ANNOUNCE_MAX_CHARS) {
      body = body.slice(0, ANNOUNCE_MAX_CHARS) + "…";
    }
    region.append(el("p", { text: t("newMessage", { from: message.from, room: message.room, body }) }));
  }
  while (region.childElementCount > 5) {
    region.firstElementChild.remove();
  }
}

// ---- own messages: pending entries and delivery status ----

function addPending(view, entry) {
  if (view.pending.has(entry.id)) {
    return;
  }
  const item = buildMessageItem({ from: session.user, ts: entry.created, body: entry.body, own: true });
  item.classList.add("pending");
  item.dataset.id = entry.id;
  view.list.append(item);
  view.pending.set(entry.id, item);
  renderPendingStatus(view, item);
  refreshDay(item);
}

function removePending(view, id) {
  const item = view.pending.get(id);
  if (item) {
    const next = item.nextElementSibling;
    item.remove();
    view.pending.delete(id);
    if (next) {
      refreshDay(next);
    }
  }
}

function renderPendingStatus(view, item) {
  const status = item.querySelector(".status");
  const entry = session.outbox ? session.outbox.find(view.room, item.dataset.id) : null;
  item.classList.toggle("failed", Boolean(entry?.failure));
  if (entry?.failure) {
    const code = `error.${entry.failure.code}`;
    const reason = hasKey(code) ? t(code) : entry.failure.code;
    const retry = el("button", { type: "button", className: "link-button", text: t("retry") });
    retry.addEventListener("click", () => session.retry(view.room, entry.id));
    const discard = el("button", { type: "button", className: "link-button", text: t("discard") });
    discard.addEventListener("click", () => session.discard(view.room, entry.id));
    status.replaceChildren(t("statusFailed", { reason }), " ", retry, " ", discard);
    status.dataset.status = "failed";
  } else if (item.dataset.stored) {
    status.replaceChildren(t("statusSent"));
    status.dataset.status = "sent";
  } else {
    status.replaceChildren(t("statusSending"));
    status.dataset.status = "sending";
  }
}

function onOutbox({ change, room, id, entry, seq, failure }) {
  const view = getView(room);
  if (change === "added") {
    addPending(view, entry);
    if (room === ui.activeRoom) {
      scrollToBottom();
    }
    return;
  }
  const item = view.pending.get(id);
  if (!item) {
    return;
  }
  if (change === "removed") {
    removePending(view, id);
    return;
  }
  if (change === "failed") {
    const code = `error.${failure.code}`;
    $("announcer").append(el("p", { text: t("statusFailed", { reason: hasKey(code) ? t(code) : failure.code }) }));
  }
  if (change === "stored") {
    const roomState = session.rooms.get(room);
    if (roomState && Number.isInteger(seq) && seq <= roomState.since) {
      // The message was delivered before this page loaded it, so it is part of the room's history already.
      removePending(view, id);
      return;
    }
    item.dataset.stored = "true";
  }
  renderPendingStatus(view, item);
}

function renderOwnStatus(room, item) {
  const status = item.querySelector(".status");
  const seq = Number(item.dataset.seq);
  const { kind, readers } = session.ownStatus(room, seq);
  let text;
  if (kind === "read") {
    text = readers.length > 1 ? t("statusReadBy", { count: readers.length }) : t("statusRead");
    status.title = readers.join(", ");
  } else {
    text = t(kind === "delivered" ? "statusDelivered" : "statusSent");
    status.removeAttribute("title");
  }
  const counts = ui.counts.get(room);
  if (counts && counts.seq === seq && kind !== "read") {
    text += ` · ${t("statusDetails", counts)}`;
  }
  status.textContent = text;
  status.dataset.status = kind;
}

/** Updates the statuses of a room's own messages once per frame, however many receipts arrive. */
function refreshStatuses(room) {
  if (ui.statusFrame.has(room)) {
    return;
  }
  ui.statusFrame.add(room);
  requestAnimationFrame(() => {
    ui.statusFrame.delete(room);
    const view = ui.views.get(room);
    if (!view) {
      return;
    }
    for (const item of view.list.querySelectorAll(".message.own[data-seq]")) {
      renderOwnStatus(room, item);
    }
  });
}

/**
 * Fetches delivery counts for the latest own message of a room that gets no receipt frames (the server may omit
 * them in large rooms) and shows them beside that message's status.
 */
function scheduleCounts(room) {
  if (!room || ui.countsTimers.has(room)) {
    return;
  }
  const timer = setTimeout(() => {
    ui.countsTimers.delete(room);
    fetchCounts(room);
  }, COUNTS_DELAY_MS);
  ui.countsTimers.set(room, timer);
}

async function fetchCounts(room) {
  const state = session.rooms.get(room);
  const view = ui.views.get(room);
  if (!state || !view || state.receipts.size > 0 || !session.connected) {
    return;
  }
  const own = [...view.list.querySelectorAll(".message.own[data-seq]")].pop();
  if (!own) {
    return;
  }

  const seq = Number(own.dataset.seq);
  const url = new URL(`api/rooms/${encodeURIComponent(room)}/receipts`, location.href);
  url.searchParams.set("seq", String(seq));
  const headers = {};
  if (session.credentials?.token) {
    headers.Authorization = `Bearer ${session.credentials.token}`;
  } else {
    url.searchParams.set("user", session.user);
  }

  try {
    const response = await fetch(url, { headers, cache: "no-store" });
    if (!response.ok) {
      console.info("parley: receipt counts unavailable for", room, "HTTP", response.status);
      return;
    }
    const data = await response.json();
    if ([data.delivered, data.read, data.members].every(Number.isInteger)) {
      ui.counts.set(room, { seq, delivered: data.delivered, read: data.read, members: data.members });
      renderOwnStatus(room, own);
    }
  } catch (error) {
    console.info("parley: receipt counts unavailable for", room, error);
  }
}

// ---- read markers ----

/** Counts a message as seen once half of it, or half of the visible area, is on screen. */
const readObserver = new IntersectionObserver(
  (entries) => {
    for (const entry of entries) {
      const seq = Number(entry.target.dataset.seq);
      if (!seq) {
        continue;
      }
      const rootHeight = entry.rootBounds ? entry.rootBounds.height : window.innerHeight;
      const seen =
        entry.isIntersecting &&
        (entry.intersectionRatio >= 0.5 || entry.intersectionRect.height >= rootHeight * 0.5);
      if (seen) {
        ui.visibleSeqs.add(seq);
      } else {
        ui.visibleSeqs.delete(seq);
      }
    }
    markVisibleRead();
  },
  { root: document.getElementById("scroller"), threshold: [0, 0.5, 1] },
);

function markVisibleRead() {
  if (!ui.activeRoom || document.visibilityState !== "visible" || ui.visibleSeqs.size === 0) {
    return;
  }
  session.markRead(ui.activeRoom, Math.max(...ui.visibleSeqs));
}

// ---- composer ----

function onComposerKeyDown(event) {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
}

function autosize() {
  const input = $("composer-input");
  input.style.height = "auto";
  input.style.height = `${input.scrollHeight}px`;
}

function onComposerSubmit(event) {
  event.preventDefault();
  const input = $("composer-input");
  const error = $("composer-error");
  const room = ui.activeRoom;
  const body = input.value;
  if (!room || body.trim() === "") {
    return;
  }
  const result = session.send(room, body);
  if (result.error) {
    error.textContent = t(result.error.key, result.error.vars);
    input.setAttribute("aria-invalid", "true");
    return;
  }
  error.textContent = "";
  input.removeAttribute("aria-invalid");
  input.value = "";
  autosize();
  input.focus();
}

// ---- session events ----

function onUser() {
  resetViews();
  renderMe();
  const key = activeKey();
  const saved = key ? storage.get(key) : null;
  selectRoom(typeof saved === "string" && session.rooms.has(saved) ? saved : null);
}

function onRooms({ added }) {
  renderRoomList();
  if (ui.activeRoom && !session.rooms.has(ui.activeRoom)) {
    selectRoom(null);
  }
  if (ui.activeRoom === added) {
    renderRoomHeader();
  }
  updateRoomControls();
  renderHistoryState();
  fillActiveView();
}

function onRoomReset({ room }) {
  const view = ui.views.get(room);
  if (view) {
    clearSequenced(view);
  }
  if (room === ui.activeRoom) {
    ui.visibleSeqs.clear();
    renderHistoryState();
    fillActiveView();
  }
}

function onHistoryState({ room }) {
  if (room === ui.activeRoom) {
    renderHistoryState();
    fillActiveView();
  }
}

function onLeft({ room }) {
  const view = ui.views.get(room);
  if (view) {
    view.list.remove();
    ui.views.delete(room);
  }
  if (room === ui.activeRoom) {
    selectRoom(null);
  }
  $("announcer").append(el("p", { text: t("roomLeft", { room }) }));
}

function onSignedOut({ reason, credentials }) {
  resetViews();
  ui.activeRoom = null;
  renderConnection();
  storage.remove(CREDENTIALS_KEY);
  if (reason === "user") {
    showSignIn(null);
    return;
  }
  if (credentials?.user) {
    $("sign-in-user").value = credentials.user;
  }
  showSignIn(reason === "token-required" ? "tokenRequired" : "unauthorized");
}

function onServerError({ code, message, ref }) {
  const reason = hasKey(`error.${code}`) ? t(`error.${code}`) : code;
  const text = t("errorGeneric", { message: message ? `${reason} (${message})` : reason });
  if (ref.type === "join") {
    $("join-error").textContent = text;
  } else {
    $("composer-error").textContent = text;
  }
}

function wireSession() {
  session.addEventListener("state", () => renderConnection());
  session.addEventListener("user", () => onUser());
  session.addEventListener("credentials", (event) => storage.set(CREDENTIALS_KEY, event.detail.credentials));
  session.addEventListener("rooms", (event) => onRooms(event.detail));
  session.addEventListener("room-reset", (event) => onRoomReset(event.detail));
  session.addEventListener("messages", (event) => onMessages(event.detail));
  session.addEventListener("history-state", (event) => onHistoryState(event.detail));
  session.addEventListener("outbox", (event) => onOutbox(event.detail));
  session.addEventListener("receipts", (event) => refreshStatuses(event.detail.room));
  session.addEventListener("presence", () => {
    renderOnline();
    renderMe();
  });
  session.addEventListener("left", (event) => onLeft(event.detail));
  session.addEventListener("signed-out", (event) => onSignedOut(event.detail));
  session.addEventListener("server-error", (event) => onServerError(event.detail));
}

function wirePage() {
  $("sign-in-form").addEventListener("submit", onSignInSubmit);
  $("sign-out").addEventListener("click", () => session.signOut("user"));
  $("reconnect-now").addEventListener("click", () => session.reconnectNow());

  $("room-list").addEventListener("click", onRoomListClick);
  $("join-form").addEventListener("submit", onJoinSubmit);
  $("leave-room").addEventListener("click", () => {
    if (ui.activeRoom) {
      session.leave(ui.activeRoom);
    }
  });
  $("back-to-rooms").addEventListener("click", () => {
    document.body.dataset.view = "rooms";
    $("room-list").querySelector("[aria-current]")?.focus();
  });

  $("composer").addEventListener("submit", onComposerSubmit);
  $("composer-input").addEventListener("keydown", onComposerKeyDown);
  $("composer-input").addEventListener("input", autosize);
  const onScroll = () => {
    if ($("scroller").scrollTop < HISTORY_TRIGGER_PX) {
      fillActiveView();
    }
  };
  $("scroller").addEventListener("scroll", onScroll, { passive: true });

  window.addEventListener("offline", () => {
    session.handleOffline();
    renderConnection();
  });
  window.addEventListener("online", () => {
    session.reconnectNow();
    renderConnection();
  });
  document.addEventListener("visibilitychange", markVisibleRead);
}

function exposeDebugHook() {
  Object.defineProperty(window, "parleyDebug", {
    value: Object.freeze({ snapshot: () => session.snapshot(), language: () => getLanguage() }),
    enumerable: false,
  });
}

function main() {
  setUpLanguageSelect();
  wireSession();
  wirePage();
  exposeDebugHook();
  applyLanguage(detectLanguage(storage, navigator.languages?.length ? navigator.languages : [navigator.language]), false);
  const credentials = storage.get(CREDENTIALS_KEY);
  if (credentials && (credentials.token || (typeof credentials.user === "string" && NAME_PATTERN.test(credentials.user)))) {
    startSession(credentials);
  } else {
    showSignIn(null);
  }
  document.documentElement.dataset.ready = "true";
}

main();
